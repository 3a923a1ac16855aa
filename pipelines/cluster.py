"""Which Dask cluster runs the job, and per-worker set-up (FAISS/OpenMP threads).

* ``client=`` given: use it as is (the caller owns it).
* ``scheduler=`` (or ``$DASK_SCHEDULER_ADDRESS``): connect to an existing cluster; it is left
  running afterwards.
* otherwise: start a ``LocalCluster`` of worker *processes* and close it when the job ends.

Dask workers run tasks in threads and default OpenMP to one thread; FAISS would otherwise pick
its own count per process (all cores on a 64-core host, times the number of workers). The
``FaissThreads`` plugin pins ``faiss.omp_set_num_threads`` to the worker's thread budget, and
because plugins are kept by the scheduler, a worker restarted after a crash gets it again.
"""
from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from contextlib import contextmanager

from distributed import Client, LocalCluster, WorkerPlugin

from b3mine.errors import B3MineError


#: Seconds a LocalCluster worker process gets to exit when the job ends, before it is killed.
WORKER_EXIT_TIMEOUT = 60.0


class ClusterError(B3MineError):
    """The Dask cluster cannot be reached or started."""


class FaissThreads(WorkerPlugin):
    """Set FAISS/OpenMP threads on every worker (present and future)."""

    name = "b3mine-faiss-threads"

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads

    def setup(self, worker) -> None:  # noqa: ANN001 - distributed.Worker
        n = self.threads or worker.state.nthreads or 1
        os.environ["OMP_NUM_THREADS"] = str(n)
        try:
            import faiss
        except ImportError:  # a worker without the mining extra still runs non-FAISS tasks
            return
        faiss.omp_set_num_threads(n)


def scheduler_address(scheduler: str | None) -> str | None:
    """The explicit address, else ``$DASK_SCHEDULER_ADDRESS``, else None (start a LocalCluster)."""
    return scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None


@contextmanager
def connect(
    *,
    client: Client | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    faiss_threads: int | None = None,
    memory_limit: str | float | None = "auto",
) -> Iterator[Client]:
    """Yield a Client for the job (see the module doc for which cluster is used)."""
    plugin = FaissThreads(faiss_threads)
    if client is not None:
        client.register_plugin(plugin)
        yield client
        return
    address = scheduler_address(scheduler)
    if address:
        try:
            remote = Client(address)
        except (OSError, TimeoutError) as exc:
            raise ClusterError(f"cannot connect to the Dask scheduler at {address}: {exc}") \
                from exc
        with remote:
            remote.register_plugin(plugin)
            yield remote
        return
    cores = os.cpu_count() or 1
    n_workers = workers or max(1, min(cores, 4))
    threads = threads_per_worker or max(1, cores // n_workers)
    # processes=True: a worker crash (or a SIGKILL) is contained and the nanny restarts it.
    with LocalCluster(n_workers=n_workers, threads_per_worker=threads, processes=True,
                      dashboard_address=":0", memory_limit=memory_limit) as cluster, \
            Client(cluster) as local:
        local.register_plugin(plugin)
        try:
            yield local
        finally:
            close_workers(cluster)


async def _close_nannies(cluster: LocalCluster, timeout: float) -> None:
    await asyncio.gather(*(nanny.close(timeout=timeout) for nanny in list(cluster.workers.values())),
                         return_exceptions=True)


def close_workers(cluster: LocalCluster, timeout: float = WORKER_EXIT_TIMEOUT) -> None:
    """Stop the worker processes, waiting up to ``timeout`` s for each to exit by itself.

    ``LocalCluster.close`` gives a worker process 4 s (0.8 x the nanny's 5 s) and then kills it
    with a "Worker process still alive after 4.0 seconds, killing" warning; a worker that has
    imported FAISS/torch on a busy host can need longer just to exit. Closing the nannies first,
    with more time, ends every job with clean exits (and nothing left for ``close`` to kill).
    """
    cluster.sync(_close_nannies, cluster, timeout)
