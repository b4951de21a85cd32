"""Generation on Ray: ``cliploom serve --ray [ADDRESS] --replicas N``.

The HTTP API and the SQLite job store stay in the server process, exactly as without Ray; the
generation moves into Ray actors, one per GPU (``num_gpus=1``) or, on a CPU-only cluster, one per
``--cpus-per-replica`` CPUs. Each replica loads the models once and runs the same
:class:`~cliploom.serve.worker.Worker` code as the single-process server, one job at a time
(a Ray actor runs one method call at a time). Ray places the actors, restarts a replica whose
process dies and carries the calls; the server only hands the oldest queued job to a free replica.

* The store: replicas reach it through a small Ray actor pinned to the server's node
  (:class:`StoreService`), so a replica on another machine reports progress and reads the cancel
  flag exactly as a local worker does. A DELETE sets that flag; the replica running the job stops
  at its next step.
* Checkpoints: per-clip segments and memory go to the job folder under ``--data-dir``, which must
  be a path every replica sees (a shared filesystem mounted at the same path on every node).
* Failures: when a replica's process dies mid-job, its call fails with ``ActorDiedError``; the job
  goes back to the queue (keeping its place) and the next free replica resumes it from its last
  finished clip (the run folder), while Ray restarts the dead replica, which rejoins once its models
  are loaded. A replica that cannot load its models reports the error (``/v1/health``) and gets no
  jobs; the jobs wait for a replica that can.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CliploomError

log = logging.getLogger(__name__)

STORE_METHODS = ("get", "step", "cancelled", "finish", "remove", "event")


def _ray():
    try:
        import ray
    except ImportError:
        raise CliploomError("--ray needs Ray", "pip install 'cliploom[ray]' (or pip install 'ray[default]')") from None
    return ray


class StoreService:
    """The job store, served to the replicas (a Ray actor on the server's node)."""

    def __init__(self, db_path: str):
        from .jobs import JobStore

        self.store = JobStore(db_path)

    def get(self, job_id):
        return self.store.get(job_id)

    def step(self, job_id, clips_done, steps_done):
        return self.store.step(job_id, clips_done, steps_done)

    def cancelled(self, job_id):
        return self.store.cancelled(job_id)

    def finish(self, job_id, error=None, data=None):
        return self.store.finish(job_id, error, data)

    def remove(self, job_id):
        return self.store.remove(job_id)

    def event(self, job_id, kind, data):
        return self.store.event(job_id, kind, data)


class StoreClient:
    """What a replica's Worker sees as its store: each call goes to the :class:`StoreService`."""

    def __init__(self, service):
        self.service = service

    def __getattr__(self, name):
        if name not in STORE_METHODS:
            raise AttributeError(name)
        ray = _ray()
        method = getattr(self.service, name)
        return lambda *args, **kwargs: ray.get(method.remote(*args, **kwargs))


class Replica:
    """One generation replica (a Ray actor): the models, loaded once, and a Worker that runs the
    jobs the server hands it."""

    def __init__(self, name: str, models: dict[str, str], jobs_dir: str, store, device: str | None, threads: int | None):
        import torch

        from .worker import Worker

        self.name, self.error, self.running, self.most_running = name, None, 0, 0
        if threads:
            torch.set_num_threads(threads)
        try:
            from ..engine import Engine

            self.engines = {n: Engine.load(p, device=device) for n, p in models.items()}
        except Exception as e:  # noqa: BLE001 - reported to the server, which gives this replica no jobs
            self.engines = {}
            self.error = (str(e).strip().splitlines() or [type(e).__name__])[0]
        self.worker = Worker(StoreClient(store), self.engines, Path(jobs_dir), name=name)

    def info(self) -> dict:
        import ray

        return {"name": self.name, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "error": self.error, "most_running": self.most_running,
                "settings": {n: e.model.settings for n, e in self.engines.items()}}

    def run(self, job_id: str) -> str:
        if self.error:
            raise CliploomError(f"replica {self.name} has no model: {self.error}", "fix the model path and restart")
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            job = self.worker.store.get(job_id)
            if job is not None:
                self.worker.run_job(job)
            return job_id
        finally:
            self.running -= 1


@dataclass
class ReplicaHandle:
    """The server's view of one replica (listed by /v1/health like a local worker)."""

    name: str
    actor: object
    state: str = "starting"  # starting | ready | failed | stopped
    current: str | None = None  # the job it runs
    ref: object = None  # its run() or info() call in flight
    error: str | None = None
    pid: int | None = None
    node: str | None = None
    restarts: int = 0
    retry_at: float = 0.0  # when to ask a restarting replica again
    cancelled_at: dict | None = None
    wake: threading.Event = field(default_factory=threading.Event)

    def is_alive(self) -> bool:
        return self.state == "ready"

    def cancel(self, job_id: str) -> None:
        """Nothing to do here: the store's cancel flag reaches the replica at its next step."""

    def stop(self) -> None:  # the server's shutdown calls this on every worker
        pass


class RayReplicas:
    """The replicas and the loop that hands queued jobs (oldest first) to free replicas."""

    def __init__(self, store, data_dir: Path, models: dict[str, str], *, address: str | None = None, replicas: int = 1,
                 cpus_per_replica: float | None = None, gpus_per_replica: float | None = None,
                 device: str | None = None, poll_seconds: float = 0.25):
        ray = _ray()
        if replicas < 1:
            raise CliploomError("--replicas must be at least 1", "use e.g. --replicas 2")
        self.store, self.poll = store, poll_seconds
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            if address in (None, "", "local"):
                ray.init(**kwargs)
            else:
                ray.init(address=address, **kwargs)
        if gpus_per_replica is None:
            gpus_per_replica = 1 if ray.cluster_resources().get("GPU", 0) >= 1 and device != "cpu" else 0
        cpus = cpus_per_replica if cpus_per_replica is not None else 1
        threads = max(1, int(cpus)) if not gpus_per_replica else None
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()
        self.service = ray.remote(num_cpus=0)(StoreService).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote(str(store.path))
        actor = ray.remote(Replica).options(num_cpus=cpus, num_gpus=gpus_per_replica, max_restarts=-1, max_task_retries=0)
        self.jobs_dir = Path(data_dir) / "jobs"
        jobs_dir = str(self.jobs_dir)
        self.handles = []
        for i in range(replicas):
            name = f"replica-{i}"
            a = actor.remote(name, models, jobs_dir, self.service,
                                                device or ("cuda" if gpus_per_replica else "cpu"), threads)
            self.handles.append(ReplicaHandle(name, a, ref=a.info.remote()))
        self.wake = threading.Event()
        for h in self.handles:
            h.wake = self.wake
        self.stopping = threading.Event()
        self.settings: dict = {}

    # -- start-up ---------------------------------------------------------------------------------
    def wait_ready(self, timeout: float = 900.0) -> dict:
        """Wait until one replica has loaded its models (or all failed); returns the models' settings."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for h in self.handles:
                if h.state == "starting" and h.ref is None and time.monotonic() >= h.retry_at:
                    h.ref = h.actor.info.remote()
            if not self._settle_some(self.poll):
                time.sleep(self.poll)
            if self.settings:
                return self.settings
            if all(h.state == "failed" for h in self.handles):
                raise CliploomError(f"no replica could load the models: {self.handles[0].error}",
                                    "check --model (each replica loads it on its own node)")
        raise CliploomError(f"no replica was ready after {timeout:.0f} s", "check the Ray cluster's resources (ray status)")

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> None:
        """Hand out jobs until :meth:`stop` (the server's main thread runs this)."""
        while not self.stopping.is_set():
            self.dispatch()
            if not self._settle_some(self.poll):
                self.wake.wait(self.poll)
                self.wake.clear()

    def dispatch(self) -> None:
        now = time.monotonic()
        for h in self.handles:
            if h.state == "starting" and h.ref is None and now >= h.retry_at:
                h.ref = h.actor.info.remote()
        for h in self.handles:
            if h.state == "ready" and h.current is None:
                job = self.store.claim(h.name)
                if job is None:
                    return
                h.current, h.ref = job.id, h.actor.run.remote(job.id)

    def _settle_some(self, timeout: float) -> bool:
        """Take the finished calls (up to ``timeout`` seconds' wait); False when none was in flight."""
        ray = _ray()
        flying = {h.ref: h for h in self.handles if h.ref is not None}
        if not flying:
            return False
        done, _ = ray.wait(list(flying), num_returns=1, timeout=timeout)  # back as soon as one finishes
        for ref in done:
            self._settle(flying[ref], ref)
        return True

    def _settle(self, h: ReplicaHandle, ref) -> None:
        ray = _ray()
        from ray.exceptions import RayActorError

        h.ref = None
        if h.current is None:  # an info() call: the replica (re)started
            try:
                info = ray.get(ref)
            except RayActorError as e:  # still restarting (or died again while loading): ask again soon
                h.error, h.retry_at = f"not available: {str(e).splitlines()[0][:200]}", time.monotonic() + 1.0
                return
            h.pid, h.node, h.error = info["pid"], info["node"], info["error"]
            h.state = "failed" if info["error"] else "ready"
            if h.error:
                log.error("%s cannot serve: %s", h.name, h.error)
            else:
                self.settings = self.settings or info["settings"]
            return
        job_id, h.current = h.current, None
        try:
            ray.get(ref)
        except RayActorError as e:  # the replica's process died mid-job: requeue; Ray restarts the replica
            log.warning("%s died running %s (%s); the job goes back to the queue", h.name, job_id,
                        str(e).splitlines()[0][:120])
            if self.store.requeue(job_id) == "deleted":  # it was being cancelled: its files go too
                import shutil

                shutil.rmtree(self.jobs_dir / job_id, ignore_errors=True)
            h.state, h.restarts = "starting", h.restarts + 1
            h.ref = h.actor.info.remote()  # answers once Ray has restarted it and its models are loaded
        except Exception as e:  # noqa: BLE001 - a job error the Worker did not record
            log.error("%s: job %s failed: %s", h.name, job_id, e)
            self.store.finish(job_id, ("internal_error", f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def replica_info(self) -> list[dict]:
        """Every live replica's own account (pid, node, the most jobs it ever ran at once)."""
        ray = _ray()
        out = []
        for h in self.handles:
            if h.state == "ready" and h.current is None:
                out.append(ray.get(h.actor.info.remote()))
        return out

    def shutdown(self) -> None:
        ray = _ray()
        self.stop()
        for h in self.handles:
            ray.kill(h.actor)
            h.state = "stopped"
        ray.kill(self.service)
