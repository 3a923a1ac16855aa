"""Plan lineage in the service: which plans a training run mined, and from which parent.

A job may carry a `b3mine.plan.PlanLineage` (``POST /v1/jobs`` body ``lineage``): its embeddings
are then a student's, the parent plan must exist here, and the lineage is written into the
plan's manifest. ``GET /v1/plans?lineage=<value>`` lists a family:

* ``value`` a run name: the plans whose lineage names that run, and their ancestors (so the
  teacher plan the run started from is listed too);
* ``value`` a plan id: that plan and every plan descended from it through ``parent`` links.

Plans are listed root first, then by training step.
"""
from __future__ import annotations

from b3mine.plan import PlanLineage

from service.errors import ApiError


def check_parent(lineage: PlanLineage | None, plan_ids: list[str]) -> None:
    """A lineage must name a parent plan that is served here (or none, for a teacher plan)."""
    if lineage is None or lineage.parent is None:
        if lineage is not None and lineage.kind == "student":
            raise ApiError(400, "a student plan's lineage needs its parent plan id",
                           "body.lineage.parent")
        return
    if lineage.parent not in plan_ids:
        raise ApiError(400, f"parent plan {lineage.parent!r} is not served here "
                       "(GET /v1/plans lists the plans)", "body.lineage.parent")


def lineage_family(value: str, lineages: dict[str, PlanLineage | None]) -> list[str]:
    """Plan ids in the family named by ``value`` (module doc), root first, then by step.

    >>> lin = {"t": PlanLineage(kind="teacher"),
    ...        "s1": PlanLineage(run="r", step=4, parent="t"),
    ...        "s2": PlanLineage(run="r", step=8, parent="s1"),
    ...        "x": None}
    >>> lineage_family("r", lin), lineage_family("s1", lin)
    (['t', 's1', 's2'], ['s1', 's2'])
    """
    children: dict[str, list[str]] = {}
    for pid, lin in lineages.items():
        if lin is not None and lin.parent is not None:
            children.setdefault(lin.parent, []).append(pid)
    chosen: set[str] = set()
    if value in lineages:  # a plan id: it and its descendants
        stack = [value]
        while stack:
            pid = stack.pop()
            if pid not in chosen:
                chosen.add(pid)
                stack.extend(children.get(pid, []))
    for pid, lin in lineages.items():  # a run: its plans and their ancestors
        if lin is not None and lin.run == value:
            while pid is not None and pid not in chosen and pid in lineages:
                chosen.add(pid)
                parent = lineages[pid]
                pid = parent.parent if parent is not None else None

    def depth(pid: str) -> int:
        n, seen = 0, set()
        while (lin := lineages.get(pid)) is not None and lin.parent and pid not in seen:
            seen.add(pid)
            pid, n = lin.parent, n + 1
        return n

    return sorted(chosen, key=lambda p: (depth(p), (lineages[p] or PlanLineage()).step, p))
