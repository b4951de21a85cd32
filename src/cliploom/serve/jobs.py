"""The job store: one SQLite file in the data dir (WAL mode), every state transition in one place.

A job is ``queued`` until a worker claims it (oldest first), ``in_progress`` while it runs, then
``completed`` or ``failed``. Deleting a queued job removes it at once; deleting a running job
sets ``cancel`` and the worker removes it at its next denoising step. A worker that dies leaves
its job ``in_progress`` with a stale heartbeat: :meth:`JobStore.requeue_stale` (run at start and
periodically) puts such jobs back in the queue, where they resume from their last checkpoint.

Events (``queued``, ``started``, ``step``, ``clip_done``, ``completed``, ``failed``, ``requeued``)
are appended per job with a sequence number, so a client that reconnects to the event stream
continues where it left off (``Last-Event-ID``).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# Schema migrations: MIGRATIONS[v] takes the database from version v to v + 1 (PRAGMA user_version).
MIGRATIONS = [
    """
    CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,   -- FIFO order
        id TEXT UNIQUE NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('queued', 'in_progress', 'completed', 'failed')),
        created_at INTEGER NOT NULL,
        started_at INTEGER,
        completed_at INTEGER,
        model TEXT NOT NULL,
        prompt TEXT NOT NULL,
        seconds TEXT NOT NULL,
        size TEXT NOT NULL,
        clips_total INTEGER NOT NULL,
        clips_done INTEGER NOT NULL DEFAULT 0,
        steps_per_clip INTEGER NOT NULL,
        steps_done INTEGER NOT NULL DEFAULT 0,
        error_code TEXT,
        error_message TEXT,
        cancel INTEGER NOT NULL DEFAULT 0,
        parent TEXT,              -- the video this one extends or re-runs
        keep INTEGER,             -- how many of the parent's clips it keeps
        worker TEXT,
        heartbeat REAL,
        attempts INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX jobs_status ON jobs (status, seq);
    CREATE TABLE events (
        job_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        type TEXT NOT NULL,
        data TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (job_id, seq)
    );
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
FINAL = ("completed", "failed")


@dataclass
class Job:
    id: str
    status: str
    created_at: int
    model: str
    prompt: str
    seconds: str
    size: str
    clips_total: int
    steps_per_clip: int
    clips_done: int = 0
    steps_done: int = 0
    started_at: int | None = None
    completed_at: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    cancel: int = 0
    parent: str | None = None
    keep: int | None = None
    worker: str | None = None
    heartbeat: float | None = None
    attempts: int = 0
    seq: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def progress(self) -> int:
        """Denoising steps done across all clips, in percent (clips kept from a parent count as done)."""
        total = self.clips_total * self.steps_per_clip
        if self.status == "completed":
            return 100
        return min(99, int(100 * self.steps_done / total)) if total else 0


class JobStore:
    """Thread-safe access to the job database (one connection per thread)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self.listeners: list = []  # called with a job id after each event is committed (same process)
        db = self._connection()
        db.execute("PRAGMA journal_mode=WAL")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            from ..errors import CliploomError

            raise CliploomError(f"job store {self.path} has schema version {version}, newer than this "
                                f"cliploom's {SCHEMA_VERSION}", "upgrade cliploom or use another --data-dir")
        for v in range(version, SCHEMA_VERSION):  # each migration and its version bump in one transaction
            db.executescript(f"BEGIN IMMEDIATE; {MIGRATIONS[v]}; PRAGMA user_version = {v + 1}; COMMIT;")

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at each checkpoint, never corrupt
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    @contextmanager
    def _tx(self):
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        self._local.touched = set()
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        for job_id in self._local.touched:
            for listener in self.listeners:
                listener(job_id)

    # -- creating and reading -----------------------------------------------------------------
    @staticmethod
    def new_id() -> str:
        return "video_" + secrets.token_hex(12)

    def create(self, job: Job, max_queued: int | None = None) -> bool:
        """Queue ``job``; False (nothing written) when ``max_queued`` jobs already wait."""
        with self._tx() as db:
            if max_queued is not None:
                queued = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
                if queued >= max_queued:
                    return False
            db.execute(
                "INSERT INTO jobs (id, status, created_at, model, prompt, seconds, size, clips_total, clips_done, "
                "steps_per_clip, steps_done, parent, keep) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.created_at, job.model, job.prompt, job.seconds, job.size, job.clips_total,
                 job.clips_done, job.steps_per_clip, job.steps_done, job.parent, job.keep),
            )
            self._event(db, job.id, "queued", {})
        return True

    def get(self, job_id: str) -> Job | None:
        row = self._connection().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def list(self, after: str | None = None, limit: int = 20, order: str = "desc") -> tuple[list[Job], bool]:
        """A page of jobs by creation order, and whether more follow (OpenAI's cursor page)."""
        db = self._connection()
        direction, cmp = ("DESC", "<") if order == "desc" else ("ASC", ">")
        args: tuple = ()
        where = ""
        if after:
            row = db.execute("SELECT seq FROM jobs WHERE id = ?", (after,)).fetchone()
            if row is not None:
                where, args = f"WHERE seq {cmp} ?", (row["seq"],)
        rows = db.execute(f"SELECT * FROM jobs {where} ORDER BY seq {direction} LIMIT ?", (*args, limit + 1)).fetchall()
        return [_job(r) for r in rows[:limit]], len(rows) > limit

    def queued_count(self) -> int:
        return self._connection().execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]

    def position(self, job_id: str) -> int | None:
        """How many queued jobs are ahead of this one."""
        row = self._connection().execute(
            "SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND seq < (SELECT seq FROM jobs WHERE id = ?)",
            (job_id,)).fetchone()
        return row[0] if row else None

    # -- the worker's transitions ---------------------------------------------------------------
    def claim(self, worker: str) -> Job | None:
        """The oldest queued job, now ``in_progress`` and owned by ``worker``; None when none waits."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET status = 'in_progress', worker = ?, heartbeat = ?, attempts = attempts + 1, "
                "started_at = COALESCE(started_at, ?) WHERE id = ?", (worker, now, int(now), row["id"]))
            self._event(db, row["id"], "started", {"worker": worker})
            return _job(db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())

    def step(self, job_id: str, clips_done: int, steps_done: int) -> bool:
        """Progress and heartbeat; returns whether the job should go on (False: cancelled or gone)."""
        db = self._connection()
        db.execute("UPDATE jobs SET clips_done = ?, steps_done = ?, heartbeat = ? WHERE id = ?",
                   (clips_done, steps_done, time.time(), job_id))
        row = db.execute("SELECT cancel FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is not None and not row["cancel"]

    def cancelled(self, job_id: str) -> bool:
        row = self._connection().execute("SELECT cancel FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is None or bool(row["cancel"])

    def finish(self, job_id: str, error: tuple[str, str] | None = None, data: dict | None = None) -> None:
        now = time.time()
        with self._tx() as db:
            if error is None:
                db.execute("UPDATE jobs SET status = 'completed', completed_at = ?, worker = NULL WHERE id = ?",
                           (int(now), job_id))
                db.execute("UPDATE jobs SET steps_done = clips_total * steps_per_clip, clips_done = clips_total "
                           "WHERE id = ?", (job_id,))
                self._event(db, job_id, "completed", data or {})
            else:
                db.execute("UPDATE jobs SET status = 'failed', completed_at = ?, error_code = ?, error_message = ?, "
                           "worker = NULL WHERE id = ?", (int(now), error[0], error[1], job_id))
                self._event(db, job_id, "failed", {"code": error[0], "message": error[1]})

    def requeue_stale(self, older_than: float, worker: str | None = None) -> list[str]:
        """Jobs ``in_progress`` whose worker stopped beating (or, with ``worker``, that worker's
        jobs) go back to the queue, ahead of nothing: they keep their place by creation order."""
        cutoff = time.time() - older_than
        with self._tx() as db:
            rows = db.execute(
                "SELECT id FROM jobs WHERE status = 'in_progress' AND (heartbeat IS NULL OR heartbeat < ? OR worker = ?)",
                (cutoff, worker)).fetchall()
            for row in rows:
                db.execute("UPDATE jobs SET status = 'queued', worker = NULL WHERE id = ?", (row["id"],))
                self._event(db, row["id"], "requeued", {})
        return [r["id"] for r in rows]

    def requeue(self, job_id: str) -> str | None:
        """A running job whose worker died goes back to the queue, keeping its place by creation
        order; one whose delete was pending is deleted instead. Returns what became of it
        (``queued``, ``deleted``, or None when it was not running)."""
        with self._tx() as db:
            row = db.execute("SELECT status, cancel FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["status"] != "in_progress":
                return None
            if row["cancel"]:
                db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
                db.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
                return "deleted"
            db.execute("UPDATE jobs SET status = 'queued', worker = NULL WHERE id = ?", (job_id,))
            self._event(db, job_id, "requeued", {})
            return "queued"

    # -- deleting -----------------------------------------------------------------------------
    def request_delete(self, job_id: str) -> str | None:
        """Delete a job that is not running (returns its former status), or mark a running one
        for cancellation (returns ``'in_progress'``); None when there is no such job."""
        with self._tx() as db:
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            if row["status"] == "in_progress":
                db.execute("UPDATE jobs SET cancel = 1 WHERE id = ?", (job_id,))
            else:
                db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
                db.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
            return row["status"]

    def remove(self, job_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            db.execute("DELETE FROM events WHERE job_id = ?", (job_id,))

    # -- events -------------------------------------------------------------------------------
    def event(self, job_id: str, kind: str, data: dict) -> None:
        with self._tx() as db:
            self._event(db, job_id, kind, data)

    def _event(self, db, job_id: str, kind: str, data: dict) -> None:
        self._local.touched.add(job_id)
        seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job_id = ?", (job_id,)).fetchone()[0]
        db.execute("INSERT INTO events (job_id, seq, type, data, at) VALUES (?, ?, ?, ?, ?)",
                   (job_id, seq, kind, json.dumps(data), time.time()))

    def events(self, job_id: str, after: int = 0) -> list[tuple[int, str, dict]]:
        rows = self._connection().execute(
            "SELECT seq, type, data FROM events WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, after)).fetchall()
        return [(r["seq"], r["type"], json.loads(r["data"])) for r in rows]


def _job(row: sqlite3.Row) -> Job:
    return Job(**{k: row[k] for k in row.keys()})
