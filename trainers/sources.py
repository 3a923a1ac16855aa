"""`open_source`: a `PlanSource` from whatever names a plan (directory, `BatchPlan`, URL).

Its own module because it knows both sources: `trainers.plans` (local) and `trainers.client`
(REST), which import nothing of each other's.
"""
from __future__ import annotations

from pathlib import Path

from b3mine.plan import BatchPlan
from trainers.client import PlanClient
from trainers.plans import LocalPlan, PlanSource


def open_source(source: PlanSource | BatchPlan | str | Path) -> PlanSource:
    """A `PlanSource` from a source, a `BatchPlan`, a plan directory or an ``http(s)://`` URL
    of the form ``http://host:port/v1/plans/<plan_id>``."""
    if isinstance(source, (str, Path)) and str(source).startswith(("http://", "https://")):
        return PlanClient.from_url(str(source))
    if isinstance(source, (BatchPlan, str, Path)):
        return LocalPlan(source)
    if isinstance(source, PlanSource):
        return source
    raise TypeError(f"not a plan source: {source!r} (expected a plan directory, a BatchPlan, "
                    f"a LocalPlan or a PlanClient)")
