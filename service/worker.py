"""Mining outside the serving process: one spawned child process per ``local`` job.

METIS, Louvain and parts of FAISS hold the GIL for seconds at a time; mined in a thread of the
server, a 200k job froze ``/healthz`` for 20 s. The child runs ``b3mine.cli.run_engine`` and
sends ``(kind, ...)`` messages over a pipe:

* ``("progress", stage, fraction)`` — forwarded to the runner's progress callback, which writes
  the registry and raises ``Interrupted`` on a cancel (the child is then killed);
* ``("done", plan_path)`` / ``("failed", message)`` / ``("bug", message)`` — the outcome.

A child that dies without an outcome (killed, out of memory) fails the job with its exit code.
The child's memory goes back to the system when the job ends, whatever the job allocated.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from b3mine.errors import B3MineError

SEND_INTERVAL_S = 0.1  # the child forwards at most ~10 progress messages a second
POLL_S = 0.25  # the parent checks cancellation at least this often while the child is silent


class JobFailed(Exception):
    """The child reported a failure (``bug``: an unexpected exception, logged with its trace)."""

    def __init__(self, message: str, *, bug: bool = False) -> None:
        super().__init__(message)
        self.bug = bug


def _child(conn: Connection, engine: str, source_json: str, config_json: str, out: str,
           options: dict[str, Any], nice: int, lineage_json: str | None = None) -> None:
    import os
    import traceback

    if nice:
        os.nice(nice)  # the serving process wins every contended core

    from b3mine.cli import run_engine
    from b3mine.config import EmbeddingSource, MiningConfig
    from b3mine.plan import PlanLineage

    last = {"stage": "", "t": 0.0}

    def progress(stage: str, fraction: float) -> None:
        now = time.monotonic()
        if stage != last["stage"] or fraction >= 1.0 or now - last["t"] >= SEND_INTERVAL_S:
            last["stage"], last["t"] = stage, now
            conn.send(("progress", stage, float(fraction)))

    try:
        plan = run_engine(engine, EmbeddingSource.model_validate_json(source_json),
                          MiningConfig.model_validate_json(config_json), Path(out), options,
                          progress, PlanLineage.model_validate_json(lineage_json)
                          if lineage_json else None)
        conn.send(("done", str(plan.path)))
    except (B3MineError, ValueError, OSError) as exc:
        conn.send(("failed", str(exc) or type(exc).__name__))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which logs it
        conn.send(("bug", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def mine_in_child(engine: str, source_json: str, config_json: str, out: Path,
                  options: dict[str, Any], progress: Callable[[str, float], None],
                  check: Callable[[], None], *, nice: int = 10,
                  lineage_json: str | None = None) -> Path:
    """Run one job in a spawned process and return the plan's path.

    The child runs ``nice`` steps below the server's CPU priority. ``progress(stage,
    fraction)`` gets the child's reports; ``check()`` runs whenever the child has been silent
    for ``POLL_S`` (a long METIS call), so a cancel is honoured within that.
    Either may raise (``Interrupted``): the child is killed before the exception propagates.
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, engine, source_json, config_json, str(out),
                                            options, nice, lineage_json),
                       daemon=True, name="b3mine-mine")
    proc.start()
    child.close()
    try:
        while True:
            if not parent.poll(POLL_S):
                if not proc.is_alive() and not parent.poll():
                    proc.join()
                    raise JobFailed(f"mining process exited with code {proc.exitcode} "
                                    "before finishing (killed, or out of memory?)")
                check()
                continue
            try:
                msg = parent.recv()
            except EOFError:
                proc.join()
                raise JobFailed(f"mining process exited with code {proc.exitcode} "
                                "before finishing (killed, or out of memory?)") from None
            if msg[0] == "progress":
                progress(msg[1], msg[2])
            elif msg[0] == "done":
                return Path(msg[1])
            else:
                raise JobFailed(msg[1], bug=msg[0] == "bug")
    finally:
        parent.close()
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
