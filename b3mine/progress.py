"""Progress reporting shared by the CLI (rich bars), the Dask pipeline and the service (job rows).

A stage reports ``callback(stage, fraction)`` with fraction in [0, 1]. Library code never prints.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

ProgressCallback = Callable[[str, float], None]

STAGES = ("load", "neighbours", "graph", "clusters", "batches", "negatives", "report", "write")
#: Rough share of a run's time per stage (neighbour search dominates), for one overall figure.
STAGE_WEIGHTS = {"load": 0.10, "neighbours": 0.50, "graph": 0.05, "clusters": 0.15,
                 "batches": 0.03, "negatives": 0.10, "report": 0.05, "write": 0.02}


def overall_fraction(stage: str, fraction: float) -> float | None:
    """The whole run's fraction done when ``stage`` is ``fraction`` done (stages run in
    `STAGES` order; a stage not reached is counted as done, as skipping it does); None for a
    name that is not a stage."""
    if stage not in STAGE_WEIGHTS:
        return None
    before = sum(STAGE_WEIGHTS[s] for s in STAGES[: STAGES.index(stage)])
    return min(1.0, before + STAGE_WEIGHTS[stage] * min(max(fraction, 0.0), 1.0))


def silent(stage: str, fraction: float) -> None:
    """The default callback: report nothing."""


@contextmanager
def stage_progress(callback: ProgressCallback | None, stage: str, total: int) -> Iterator[
        Callable[[int], None]]:
    """Yield ``advance(n)``; reports 0 on entry and 1 on a clean exit."""
    cb = callback or silent
    done = 0
    cb(stage, 0.0)

    def advance(n: int = 1) -> None:
        nonlocal done
        done += n
        cb(stage, min(1.0, done / total) if total else 1.0)

    yield advance
    cb(stage, 1.0)


class RichProgress:
    """A ProgressCallback that draws one rich progress bar per stage (used by the CLI)."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description:<11}"), BarColumn(), TextColumn(
                "{task.percentage:>5.1f}%"), TimeElapsedColumn(), transient=False)
        self._tasks: dict[str, int] = {}

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def __call__(self, stage: str, fraction: float) -> None:
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(stage, total=1.0)
        self._progress.update(self._tasks[stage], completed=fraction)
