"""Re-mining during training: the student refreshes its own plan while it trains on the old one.

A plan mined once by a frozen teacher goes stale as the student learns. Every ``every`` steps a
`Refresher` takes the current student's embeddings of the training pairs (queries and targets),
writes them to a Parquet file and mines a plan from them in the background: in a thread of this
process (`LocalSubmitter`, any `b3mine.cli.run_engine` engine) or as a job of the REST service
(`ServiceSubmitter`, ``POST /v1/jobs`` with a lineage naming the parent plan). Training goes on
with the old plan meanwhile. A `RefreshingBatchSampler` takes the new plan at an epoch boundary
of the sampler: the first one at least ``lag`` steps after the refresh started. If the job is not
finished by then, training waits for it there (the wait is logged): the switch step is then a
function of the schedule alone, never of how fast a job ran, which is what makes a run
reproducible and a resume exact. ``lag`` is the time budget of a job, in steps; with the default
0 the new plan is taken at the very next boundary.

**Blend.** With ``teacher_weight`` a > 0 the mined vectors are the concatenation
``[sqrt(a) * teacher, sqrt(1 - a) * student]`` of the L2-normalised embeddings. Their dot
product is ``a * cos_teacher + (1 - a) * cos_student`` exactly, and their norm is 1, so the
miner's own normalisation leaves them as they are: the plan is mined on the blended cosine.

**Exact resume.** `Refresher.state_dict` records the plan being served, the refresh in flight
(its start step, parent, the embeddings file and the plan id it will have) and the history of
switches; the sampler's own state records its plan id and position. A resumed run re-opens that
plan and re-submits the refresh in flight. Plans are content-addressed (``plan_id`` hashes the
embeddings and the config), and the plan id of a refresh is computed from its file before it is
mined: a plan that already exists is re-used, whoever mined it (this process, another engine, the
service). The student embeds on CPU in eval mode on one thread with a fixed chunk size, so the
same weights give the same bytes, the same plan id, and the same batches.

**Probe.** Each refresh logs how hard the batches being served are *for the student*: the mean
student cosine between a query and the other targets of its batch (``hardness``), next to the
mean over random pairs (``random``). ``mode="probe"`` measures only, without re-mining (the
static-plan baseline of ``benchmarks/remine.py``).

Use from any loop (the reference trainer wires it in with ``--remine-every``)::

    refresher = Refresher(LocalSubmitter("plans", "run/remine"), ids=train_ids,
                          mining_config=cfg, every=200, current=plan_source, run="run-1",
                          embed=lambda: (encode(queries), encode(targets)))
    sampler = RefreshingBatchSampler.wrap(PlanBatchSampler(plan_source, ids=train_ids), refresher)
    for step, batch in enumerate(batches(sampler), 1):
        train_step(batch)
        events = refresher.after_step(step)

`trainers.remine_st.RemineCallback` does the ``after_step`` part in a sentence-transformers run.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from b3mine.config import EmbeddingSource, MiningConfig
from b3mine.embeddings import load_embeddings
from b3mine.plan import MANIFEST, PlanLineage, plan_id_for
from trainers.plans import LocalPlan, PlanSource
from trainers.samplers import PlanBatchSampler

QUERY_COLUMN, TARGET_COLUMN = "query_embedding", "target_embedding"
Mode = Literal["refresh", "probe"]


# -- embeddings -----------------------------------------------------------------------------

def blend(student: tuple[np.ndarray, np.ndarray], teacher: tuple[np.ndarray, np.ndarray] | None,
          teacher_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """(queries, targets) whose dot products are ``a*cos_teacher + (1-a)*cos_student``.

    >>> s = (np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32))
    >>> t = (np.array([[1, 0], [1, 0]], np.float32),) * 2
    >>> q, k = blend(s, t, 0.25)
    >>> np.round(q @ k.T, 6).tolist()  # 0.25 * teacher cosines + 0.75 * student cosines
    [[1.0, 0.25], [0.25, 1.0]]
    """
    def unit(m: np.ndarray) -> np.ndarray:
        m = np.asarray(m, dtype=np.float32)
        return m / np.linalg.norm(m, axis=1, keepdims=True).clip(min=1e-12)

    if not 0 <= teacher_weight < 1:
        raise ValueError(f"teacher_weight must be in [0, 1), got {teacher_weight}")
    if teacher_weight == 0 or teacher is None:
        return unit(student[0]), unit(student[1])
    a, b = np.float32(np.sqrt(teacher_weight)), np.float32(np.sqrt(1 - teacher_weight))
    return tuple(np.ascontiguousarray(np.concatenate([a * unit(t), b * unit(s)], axis=1))
                 for s, t in zip(student, teacher))  # type: ignore[return-value]


def write_pairs(path: Path, ids: np.ndarray, queries: np.ndarray, targets: np.ndarray) -> Path:
    """Paired embeddings as Parquet (``id``, `QUERY_COLUMN`, `TARGET_COLUMN`), atomically."""
    def column(m: np.ndarray) -> pa.Array:
        m = np.ascontiguousarray(m, dtype=np.float32)
        return pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), m.shape[1])

    ids = np.asarray(ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    id_col = pa.array(ids.tolist() if ids.dtype.kind in "OUS" else ids)
    pq.write_table(pa.table({"id": id_col, QUERY_COLUMN: column(queries),
                             TARGET_COLUMN: column(targets)}), tmp)
    os.replace(tmp, path)
    return path


def pairs_source(path: str | Path) -> EmbeddingSource:
    return EmbeddingSource(path=str(path), column=QUERY_COLUMN, target_column=TARGET_COLUMN)


def batch_hardness(queries: np.ndarray, targets: np.ndarray, batches: np.ndarray
                   ) -> dict[str, float]:
    """How hard batches are for an encoder: mean cosine of a query with the *other* targets of
    its batch (``hardness``), and over all pairs of distinct rows (``random``, what random
    batches average). ``batches`` is (n_batches, B) of row indices into the embeddings."""
    q = np.asarray(queries, dtype=np.float64)
    t = np.asarray(targets, dtype=np.float64)
    b = np.asarray(batches, dtype=np.int64)
    size = b.shape[1]
    q_sum, t_sum = q[b].sum(1), t[b].sum(1)  # (nb, d)
    diag = np.einsum("nbd,nbd->n", q[b], t[b])
    in_batch = ((np.einsum("nd,nd->n", q_sum, t_sum) - diag) / (size * (size - 1))).mean()
    n = len(q)
    everything = (q.sum(0) @ t.sum(0) - np.einsum("nd,nd->", q, t)) / (n * (n - 1))
    return {"hardness": round(float(in_batch), 6), "random": round(float(everything), 6)}


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread: reductions in a fixed order, the same bytes every time."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- where refreshes are mined --------------------------------------------------------------

class Submitter(Protocol):
    """Mines refresh plans somewhere and opens them as plan sources."""

    def embeddings_path(self, name: str) -> Path:
        """Where a refresh's embeddings file goes (the miner must be able to read it)."""
        ...

    def exists(self, plan_id: str) -> bool: ...

    def mine(self, path: Path, config: MiningConfig, lineage: PlanLineage) -> str:
        """Mine ``path`` (blocking; called in a background thread); returns the plan id."""
        ...

    def open(self, plan_id: str) -> PlanSource: ...


class LocalSubmitter:
    """Mine in this process (a background thread) with a `b3mine.cli.run_engine` engine.

    The local engine skips the plan's quality report (its PNG costs seconds, more than the
    mining at small scale); the refresher's own hardness probe measures what matters here.
    The report is no part of the plan id: a plan is the same plan with or without it."""

    def __init__(self, plans_dir: str | Path, files_dir: str | Path, *, engine: str = "local",
                 options: dict[str, Any] | None = None) -> None:
        self.plans_dir, self.files_dir = Path(plans_dir), Path(files_dir)
        self.engine, self.options = engine, dict(options or {})

    def embeddings_path(self, name: str) -> Path:
        return self.files_dir / name

    def exists(self, plan_id: str) -> bool:
        return (self.plans_dir / plan_id / MANIFEST).is_file()

    def mine(self, path: Path, config: MiningConfig, lineage: PlanLineage) -> str:
        from b3mine.cli import run_engine
        from b3mine.mining import mine

        if self.engine == "local":
            return mine(pairs_source(path), config, self.plans_dir, report=False,
                        lineage=lineage).plan_id
        return run_engine(self.engine, pairs_source(path), config, self.plans_dir, self.options,
                          None, lineage).plan_id

    def open(self, plan_id: str) -> PlanSource:
        return LocalPlan(self.plans_dir / plan_id)


class ServiceSubmitter:
    """Mine as jobs of the REST service; read the plans back with `trainers.client.PlanClient`.

    The service reads datasets under its data root, so the embeddings are written under
    ``data_root`` (that root as this machine mounts it) in ``remine/<run>/``; the job names the
    file relative to the root. The parent plan must be served (the service checks it)."""

    def __init__(self, url: str, data_root: str | Path, run: str, *, api_key: str | None = None,
                 poll_s: float = 0.1, timeout: float = 30.0) -> None:
        from trainers.client import API_KEY_ENV

        self.url, self.data_root, self.run = url.rstrip("/"), Path(data_root), run
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.poll_s, self.timeout = poll_s, timeout
        self.stop = threading.Event()

    def _headers(self) -> dict[str, str]:
        return {"X-API-Key": self.api_key} if self.api_key else {}

    def embeddings_path(self, name: str) -> Path:
        return self.data_root / "remine" / self.run / name

    def exists(self, plan_id: str) -> bool:
        import httpx

        try:
            r = httpx.get(f"{self.url}/v1/plans/{plan_id}", headers=self._headers(),
                          timeout=self.timeout)
        except httpx.HTTPError:  # unreachable now: the job submission reports it, in the
            return False         # background, and the old plan keeps serving
        return r.status_code == 200

    def mine(self, path: Path, config: MiningConfig, lineage: PlanLineage) -> str:
        import httpx

        from trainers.client import PlanServiceError, _server_message

        body = {"dataset": pairs_source(path.relative_to(self.data_root).as_posix())
                .model_dump(mode="json", exclude_none=True),
                "config": config.model_dump(mode="json"),
                "lineage": lineage.model_dump(mode="json")}
        with httpx.Client(base_url=self.url, headers=self._headers(),
                          timeout=self.timeout) as http:
            r = http.post("/v1/jobs", json=body)
            if r.status_code not in (200, 202):
                raise PlanServiceError(f"refresh job refused: {_server_message(r)}",
                                       status=r.status_code, url=f"{self.url}/v1/jobs")
            job = r.json()
            while job["state"] not in ("succeeded", "failed", "cancelled"):
                if self.stop.wait(self.poll_s):
                    raise PlanServiceError(f"stopped waiting for job {job['id']}")
                job = http.get(f"/v1/jobs/{job['id']}").json()
        if job["state"] != "succeeded":
            raise PlanServiceError(f"refresh job {job['id']} {job['state']}: {job['error']}")
        return str(job["plan_id"])

    def open(self, plan_id: str) -> PlanSource:
        from trainers.client import PlanClient

        return PlanClient(self.url, plan_id, api_key=self.api_key)


# -- the schedule ---------------------------------------------------------------------------

@dataclass
class Refresh:
    """A refresh in flight: started after ``step``, mining ``file`` into plan ``plan_id``."""

    step: int
    parent: str
    plan_id: str
    file: str


class Refresher:
    """The refresh schedule (module doc). ``after_step`` after every optimizer step; the
    sampler asks `at_epoch_boundary` for the plan to use at each epoch start.

    Args:
        submitter: where refreshes are mined.
        ids: the training rows' ids, in dataset order (the embeddings file carries them).
        mining_config: the config of every refresh plan.
        every: refresh after steps every, 2*every, ... (``until`` excluded).
        current: the plan training starts on.
        run: names the run in the plans' lineage.
        embed: () -> (query, target) student embeddings of the training rows.
        lag: steps a refresh may run before the trainer waits for it.
        teacher, teacher_weight: blend the student with these teacher embeddings.
        current_batches: () -> (n_batches, B) row indices of the epoch being served (probe).
        mode: ``"probe"`` measures hardness and never re-mines.
    """

    def __init__(self, submitter: Submitter, *, ids: np.ndarray, mining_config: MiningConfig,
                 every: int, current: PlanSource, run: str,
                 embed: Callable[[], tuple[np.ndarray, np.ndarray]], lag: int = 0,
                 until: int | None = None,
                 teacher: tuple[np.ndarray, np.ndarray] | None = None,
                 teacher_weight: float = 0.0,
                 current_batches: Callable[[], np.ndarray] | None = None,
                 mode: Mode = "refresh") -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.submitter, self.ids, self.config = submitter, np.asarray(ids), mining_config
        self.every, self.lag, self.until, self.run, self.mode = every, lag, until, run, mode
        self.embed, self.current_batches = embed, current_batches
        self.teacher, self.teacher_weight = teacher, teacher_weight
        self.current = current
        self._sources: dict[str, PlanSource] = {current.plan_id: current}
        self.step = 0
        self.pending: Refresh | None = None
        self.history: list[dict[str, Any]] = []  # switches: {"step", "plan_id"}
        self._future: Future | None = None
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()  # the mining thread adds events too
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="b3mine-remine")

    # -- sources -------------------------------------------------------------------------------
    def source_for(self, plan_id: str) -> PlanSource:
        if plan_id not in self._sources:
            self._sources[plan_id] = self.submitter.open(plan_id)
        return self._sources[plan_id]

    # -- the two hooks -------------------------------------------------------------------------
    def after_step(self, step: int) -> list[dict[str, Any]]:
        """Record that ``step`` steps are done; start a refresh when one is due. Returns the
        events since the last call (for the metrics log)."""
        self.step = step
        if step % self.every == 0 and (self.until is None or step < self.until):
            self._start(step)
        return self._drain()

    def _drain(self) -> list[dict[str, Any]]:
        with self._lock:
            events, self._events = self._events, []
        return events

    def at_epoch_boundary(self) -> PlanSource | None:
        """The plan to switch to now, at the start of a sampler epoch, or None to keep the
        current one. Waits for a refresh whose lag has run out."""
        p = self.pending
        if p is None or self.step < p.step + self.lag or self._future is None:
            return None
        t0 = time.perf_counter()
        ready = self._future.done()
        try:
            self._future.result()
        except Exception as exc:  # a failed refresh keeps the old plan; training goes on
            self._event("failed", refresh=p.step, plan_id=p.plan_id, error=str(exc))
            self.pending, self._future = None, None
            return None
        self.pending, self._future = None, None
        self.current = self.source_for(p.plan_id)
        self.history.append({"step": self.step, "plan_id": p.plan_id})
        self._event("switched", refresh=p.step, plan_id=p.plan_id, parent=p.parent,
                    ready=ready, wait_seconds=round(time.perf_counter() - t0, 3))
        return self.current

    # -- refreshes -----------------------------------------------------------------------------
    def _event(self, event: str, step: int | None = None, **fields: Any) -> None:
        with self._lock:
            self._events.append({"type": "remine", "step": self.step if step is None else step,
                                 "event": event, **fields})

    def _start(self, step: int) -> None:
        t0 = time.perf_counter()
        student = self.embed()
        embed_s = time.perf_counter() - t0
        probe = {}
        if self.current_batches is not None:
            probe = batch_hardness(*student, self.current_batches())
        if self.mode == "probe":
            self._event("probe", plan_id=self.current.plan_id, embed_seconds=round(embed_s, 3),
                        **probe)
            return
        if self.pending is not None:  # one refresh at a time: this one is skipped
            self._event("skipped", pending=self.pending.step, **probe)
            return
        q, t = blend(student, self.teacher, self.teacher_weight)
        path = write_pairs(self.submitter.embeddings_path(f"step-{step:08d}.parquet"),
                           self.ids, q, t)
        # The id the plan will have: the same bytes the miner hashes, read back the same way.
        plan_id = plan_id_for(load_embeddings(pairs_source(path)).fingerprint(), self.config)
        self.pending = Refresh(step=step, parent=self.current.plan_id, plan_id=plan_id,
                               file=str(path))
        reused = self._submit(self.pending)
        self._event("submitted", plan_id=plan_id, parent=self.current.plan_id, reused=reused,
                    embed_seconds=round(embed_s, 3), **probe)

    def _submit(self, p: Refresh) -> bool:
        """Start mining ``p`` in the background; True if its plan already exists."""
        if self.submitter.exists(p.plan_id):
            done: Future = Future()
            done.set_result(p.plan_id)
            self._future = done
            return True
        lineage = PlanLineage(kind="student", run=self.run, step=p.step, parent=p.parent,
                              teacher_weight=self.teacher_weight)
        self._future = self._pool.submit(self._mine, p, lineage)
        return False

    def _mine(self, p: Refresh, lineage: PlanLineage) -> str:
        t0 = time.perf_counter()
        got = self.submitter.mine(Path(p.file), self.config, lineage)
        if got != p.plan_id:  # the content-addressing contract this module relies on
            raise RuntimeError(f"refresh of step {p.step} mined plan {got}, expected {p.plan_id}")
        self._event("mined", step=p.step, plan_id=got,
                    mine_seconds=round(time.perf_counter() - t0, 3))
        return got

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current.plan_id, "step": self.step, "history": self.history,
                "pending": asdict(self.pending) if self.pending else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue on the checkpoint's plan; re-submit the refresh that was in flight (a plan
        that already exists, under its content id, is re-used)."""
        self.current = self.source_for(state["current"])
        self.step, self.history = int(state["step"]), list(state["history"])
        self.pending = Refresh(**state["pending"]) if state.get("pending") else None
        if self.pending is not None:
            if not self.submitter.exists(self.pending.plan_id) and not Path(
                    self.pending.file).is_file():
                raise FileNotFoundError(
                    f"the checkpoint's refresh of step {self.pending.step} needs "
                    f"{self.pending.file}, which is gone: restore it or start a new run")
            reused = self._submit(self.pending)
            self._event("resubmitted", refresh=self.pending.step, plan_id=self.pending.plan_id,
                        reused=reused)

    def close(self) -> list[dict[str, Any]]:
        """Stop: a refresh still in flight is finished (its plan serves a later resume) unless
        it waits on a service, which is abandoned. Returns the last events."""
        stop = getattr(self.submitter, "stop", None)
        if stop is not None:
            stop.set()
        self._pool.shutdown(wait=True)
        return self._drain()


class RefreshingBatchSampler(PlanBatchSampler):
    """A `PlanBatchSampler` that takes the `Refresher`'s new plan at the start of an epoch.

    Only a fresh epoch switches: an iteration that resumes mid-epoch (after `load_state_dict`)
    finishes the epoch on the plan it was on. ``len()`` is the current plan's: a switch can
    change the number of batches per epoch by a few (clustering drops different rows).
    """

    refresher: Refresher
    _options: dict[str, Any]

    @classmethod
    def wrap(cls, sampler: PlanBatchSampler, refresher: Refresher) -> RefreshingBatchSampler:
        """The same sampler (source, id matching, slicing, position), refreshing."""
        options = dict(ids=sampler.index.ids if sampler.index.by_id else None,
                       rank=sampler.rank, world_size=sampler.world_size, layout=sampler.layout,
                       negatives=sampler.negatives, skip_padded=sampler.skip_padded,
                       on_exhausted=sampler.on_exhausted)
        out = cls(sampler.source, **options, epoch=sampler.epoch)
        out.refresher, out._options = refresher, options
        return out

    def _switch(self, source: PlanSource) -> None:
        PlanBatchSampler.__init__(self, source, **self._options, epoch=self.epoch)

    def __iter__(self) -> Iterator[list[int]]:
        if self._resume_at == 0:
            new = self.refresher.at_epoch_boundary()
            if new is not None:
                self._switch(new)
        yield from super().__iter__()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("plan_id") != self.plan_id:
            self._switch(self.refresher.source_for(str(state.get("plan_id"))))
        super().load_state_dict(state)


# -- the reference trainer (`b3mine train --remine-every N`) ---------------------------------

def for_trainer(trainer: Any) -> Refresher:
    """A `Refresher` for a `trainers.train.loop.Trainer`, its sampler wrapped to refresh.

    The run is named by the config's digest (the same for a resumed run); refresh plans go to
    ``plans_dir`` (or the service), their embeddings to ``output_dir/remine/``."""
    from trainers.train.sampling import mining_config

    cfg, tr = trainer.config, trainer.data.train
    run = cfg.digest()
    submitter: Submitter
    if cfg.remine_service:
        submitter = ServiceSubmitter(cfg.remine_service, cfg.remine_service_data, run)
    else:
        submitter = LocalSubmitter(cfg.plans_dir, Path(cfg.output_dir) / "remine")

    def embed() -> tuple[np.ndarray, np.ndarray]:
        with one_thread():
            return (trainer.model.embed(trainer.q_tokens).float().numpy(),
                    trainer.model.embed(trainer.t_tokens).float().numpy())

    def current_batches() -> np.ndarray:
        s = trainer.sampler
        return s._load(s.plan_epoch(s.epoch))[0]

    refresher = Refresher(
        submitter, ids=tr.ids, mining_config=mining_config(cfg, len(tr)),
        every=cfg.remine_every, lag=cfg.remine_lag, until=cfg.steps,
        current=trainer.sampler.source, run=run, embed=embed,
        teacher=(tr.query_emb, tr.target_emb) if cfg.remine_teacher_weight else None,
        teacher_weight=cfg.remine_teacher_weight, current_batches=current_batches,
        mode=cfg.remine_mode)
    trainer.sampler = RefreshingBatchSampler.wrap(trainer.sampler, refresher)
    return refresher
