"""The job registry: one SQLite table (stdlib ``sqlite3``, WAL) that survives restarts.

A job is identified by a hash of its dataset reference (plus a stat stamp of the files) and the
config's digest, so submitting the same request twice finds the same row.

States::

    queued --claim--> running --> succeeded (plan_id)
       |                 |------> failed (error)
       |                 '------> cancelled (DELETE, noticed at the next progress callback)
       '--DELETE--> cancelled
    failed/cancelled --resubmit--> queued

Faults (see ``check_writable``): ``/readyz`` writes a heartbeat row, so a read-only or full
database is reported, not discovered by the next job. The database file's identity (device,
inode) is checked before every write: deleted under a running server, it is restored from the
open connection (SQLite's backup API) instead of letting every job row vanish at the next
restart; replaced by another file, writes stop with ``RegistryUnavailable``. The API answers
registry failures with 503 (retry), and the runner retries its own writes, so no job is left
``running`` because one write failed.

Restart policy (see ``recover``): a row left ``running`` by a process that is gone is marked
``failed`` with the reason ``RESTART_REASON``; it is *not* resumed automatically, because a job
that took the service down (out of memory, say) would otherwise take it down again at every
start. Submitting the same request again re-queues it. Rows still ``queued`` never started, so
they are resumed. Writes by a worker are conditional on it still owning the row, so a worker of
a previous life can never overwrite what recovery decided.
"""
from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

log = logging.getLogger("b3mine.service")

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
STATES: tuple[JobState, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL = ("succeeded", "failed", "cancelled")
RESTART_REASON = "service restarted while running"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id               TEXT PRIMARY KEY,
    state            TEXT NOT NULL,
    dataset          TEXT NOT NULL,
    config           TEXT NOT NULL,
    engine           TEXT NOT NULL,
    plan_id          TEXT,
    stage            TEXT,
    progress         REAL NOT NULL DEFAULT 0,
    error            TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    owner            TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    started_at       TEXT,
    finished_at      TEXT,
    lineage          TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS heartbeat (id INTEGER PRIMARY KEY, at TEXT NOT NULL);
"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Job:
    id: str
    state: JobState
    dataset: str  # EmbeddingSource JSON, paths relative to the data root
    config: str  # MiningConfig canonical JSON
    engine: str
    plan_id: str | None
    stage: str | None
    progress: float
    error: str | None
    cancel_requested: bool
    owner: str | None
    attempts: int
    created_at: str
    updated_at: str
    started_at: str | None
    finished_at: str | None
    lineage: str | None = None  # b3mine.plan.PlanLineage JSON, for the plan's manifest

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        data = dict(row)
        data["cancel_requested"] = bool(data["cancel_requested"])
        return cls(**data)


def new_owner() -> str:
    """``host:pid:boot`` — the boot id tells two lives of one pid apart."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def owner_is_orphaned(owner: str | None, me: str) -> bool:
    """True if the process named by ``owner`` can no longer be running the job.

    Sibling uvicorn workers share the database, so a live process on this host with another pid
    keeps its jobs; everything else (a dead pid, an earlier life of our own pid, another host —
    SQLite files are not shared across hosts, so that is a recreated container) is orphaned.
    """
    if not owner:
        return True
    try:
        host, pid_text, _boot = owner.split(":", 2)
        pid = int(pid_text)
    except ValueError:
        return True
    my_host, my_pid, _ = me.split(":", 2)
    if owner == me:
        return False  # our own, live job
    if host != my_host:
        return True
    if pid == int(my_pid):
        return True  # same pid, different boot: an earlier life of this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by another user
    return False


class Interrupted(Exception):
    """The worker must stop: the job was cancelled, or this process no longer owns it."""

    def __init__(self, reason: Literal["cancelled", "lost", "shutdown"]) -> None:
        super().__init__(reason)
        self.reason = reason


class RegistryUnavailable(sqlite3.OperationalError):
    """The registry cannot be written safely (its file was replaced, say): answer 503."""


class JobRegistry:
    """Thread-safe access to the jobs table. One connection, serialised by a lock (ops are
    sub-millisecond); WAL lets other processes (sibling workers) read while one writes."""

    def __init__(self, path: Path, *, timeout: float = 30.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.timeout = timeout
        self._lock = threading.Lock()
        self._conn = self._open()
        self._conn.executescript(_SCHEMA)
        self._identity = self._file_identity()

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                               check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints
        return conn

    def _file_identity(self) -> tuple[int, int]:
        st = os.stat(self.path)
        return st.st_dev, st.st_ino

    def _ensure_file(self) -> None:
        """(lock held) The connection still writes the file at ``path``; a deleted file is
        restored from the connection, a replaced one stops writes."""
        try:
            identity = self._file_identity()
        except FileNotFoundError:
            restored = sqlite3.connect(self.path, isolation_level=None)
            try:
                self._conn.backup(restored)
            finally:
                restored.close()
            self._conn.close()
            self._conn = self._open()
            self._identity = self._file_identity()
            log.warning("job registry %s was deleted under the running service: restored "
                        "from the open connection", self.path)
            return
        if identity != self._identity:
            raise RegistryUnavailable(f"the job registry file {self.path.name} was replaced "
                                      "under the running service; restart it")

    def check_writable(self) -> None:
        """Raise (sqlite3.Error) unless a write to the registry file on disk succeeds."""
        with self._lock:
            self._ensure_file()
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute("INSERT OR REPLACE INTO heartbeat (id, at) VALUES (1, ?)",
                                   (_now(),))
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        columns = {r[1] for r in self._conn.execute("PRAGMA table_info(jobs)").fetchall()}
        if "lineage" not in columns:  # a database from before job lineage
            self._conn.execute("ALTER TABLE jobs ADD COLUMN lineage TEXT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _tx(self, fn: Callable[[sqlite3.Connection], object]) -> object:
        with self._lock:
            self._ensure_file()
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            return result

    def ping(self) -> None:
        with self._lock:
            self._conn.execute("SELECT 1").fetchone()

    # -- reads -------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def list(self, state: str | None = None, limit: int = 100, offset: int = 0) -> list[Job]:
        sql, args = "SELECT * FROM jobs", []
        if state:
            sql += " WHERE state = ?"
            args.append(state)
        sql += " ORDER BY created_at DESC, id LIMIT ? OFFSET ?"
        with self._lock:
            rows = self._conn.execute(sql, (*args, limit, offset)).fetchall()
        return [Job.from_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        out = dict.fromkeys(STATES, 0)
        out.update({state: n for state, n in rows})
        return out

    # -- writes ------------------------------------------------------------------------------
    def submit(self, job_id: str, dataset: str, config: str, engine: str,
               lineage: str | None = None
               ) -> tuple[Job, Literal["created", "requeued", "existing"]]:
        """Insert a queued job, re-queue a failed/cancelled one, or return the existing one."""
        def tx(c: sqlite3.Connection) -> tuple[Job, str]:
            row = c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            now = _now()
            if row is None:
                c.execute("INSERT INTO jobs (id, state, dataset, config, engine, created_at, "
                          "updated_at, lineage) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?)",
                          (job_id, dataset, config, engine, now, now, lineage))
                outcome = "created"
            elif row["state"] in ("failed", "cancelled"):
                c.execute("UPDATE jobs SET state='queued', engine=?, stage=NULL, progress=0, "
                          "error=NULL, cancel_requested=0, owner=NULL, plan_id=NULL, "
                          "updated_at=?, started_at=NULL, finished_at=NULL WHERE id=?",
                          (engine, now, job_id))
                outcome = "requeued"
            else:
                outcome = "existing"
            job = Job.from_row(c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
            return job, outcome

        return self._tx(tx)  # type: ignore[return-value]

    def claim(self, job_id: str, owner: str) -> Job | None:
        """queued -> running for ``owner``; None if another worker took it or it was cancelled."""
        now = _now()
        with self._lock:
            self._ensure_file()
            cur = self._conn.execute(
                "UPDATE jobs SET state='running', owner=?, stage=NULL, progress=0, "
                "attempts=attempts+1, started_at=?, updated_at=? WHERE id=? AND state='queued'",
                (owner, now, now, job_id))
            if cur.rowcount != 1:
                return None
            row = self._conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row)

    def progress(self, job_id: str, owner: str, stage: str, fraction: float) -> None:
        """Record progress; raise Interrupted if the job was cancelled or is no longer ours."""
        with self._lock:
            self._ensure_file()
            cur = self._conn.execute(
                "UPDATE jobs SET stage=?, progress=?, updated_at=? "
                "WHERE id=? AND owner=? AND state='running'",
                (stage, float(fraction), _now(), job_id, owner))
            if cur.rowcount != 1:
                raise Interrupted("lost")
            row = self._conn.execute("SELECT cancel_requested FROM jobs WHERE id=?",
                                     (job_id,)).fetchone()
        if row and row[0]:
            raise Interrupted("cancelled")

    def check(self, job_id: str, owner: str) -> None:
        """Raise Interrupted if the job was cancelled or is no longer ``owner``'s (read only)."""
        with self._lock:
            row = self._conn.execute("SELECT owner, state, cancel_requested FROM jobs "
                                     "WHERE id=?", (job_id,)).fetchone()
        if row is None or row["owner"] != owner or row["state"] != "running":
            raise Interrupted("lost")
        if row["cancel_requested"]:
            raise Interrupted("cancelled")

    def finish(self, job_id: str, owner: str, state: JobState, *, plan_id: str | None = None,
               error: str | None = None) -> bool:
        now = _now()
        with self._lock:
            self._ensure_file()
            cur = self._conn.execute(
                "UPDATE jobs SET state=?, plan_id=?, error=?, updated_at=?, finished_at=?, "
                "progress=CASE WHEN ?='succeeded' THEN 1.0 ELSE progress END "
                "WHERE id=? AND owner=? AND state='running'",
                (state, plan_id, error, now, now, state, job_id, owner))
        return cur.rowcount == 1

    def request_cancel(self, job_id: str) -> Job | None:
        """queued -> cancelled now; running -> flag the worker; final states stay as they are."""
        def tx(c: sqlite3.Connection) -> Job | None:
            now = _now()
            c.execute("UPDATE jobs SET state='cancelled', error='cancelled before it started', "
                      "updated_at=?, finished_at=? WHERE id=? AND state='queued'",
                      (now, now, job_id))
            c.execute("UPDATE jobs SET cancel_requested=1, updated_at=? "
                      "WHERE id=? AND state='running'", (now, job_id))
            row = c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return Job.from_row(row) if row else None

        return self._tx(tx)  # type: ignore[return-value]

    def recover(self, me: str) -> tuple[list[str], list[str]]:
        """At start-up: fail the running jobs whose process is gone; return (failed, queued)."""
        def tx(c: sqlite3.Connection) -> tuple[list[str], list[str]]:
            now = _now()
            failed = []
            for row in c.execute("SELECT id, owner FROM jobs WHERE state='running'").fetchall():
                if owner_is_orphaned(row["owner"], me):
                    c.execute("UPDATE jobs SET state='failed', error=?, updated_at=?, "
                              "finished_at=? WHERE id=? AND state='running'",
                              (RESTART_REASON, now, now, row["id"]))
                    failed.append(row["id"])
            queued = [r[0] for r in c.execute(
                "SELECT id FROM jobs WHERE state='queued' ORDER BY created_at").fetchall()]
            return failed, queued

        return self._tx(tx)  # type: ignore[return-value]
