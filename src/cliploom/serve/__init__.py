"""``cliploom serve``: long videos as a service, with OpenAI's videos API (see docs/serve.md).

    cliploom serve --port 8000 --data-dir ./cliploom-data --model builtin=builtin --token T

Rooms: ``api`` (routes), ``forms`` (request -> story), ``jobs`` (the SQLite job store),
``worker`` (runs jobs through ``Engine``), ``page/`` (the web page, plain HTML/JS/CSS).
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import threading
from pathlib import Path

from ..errors import CliploomError

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def lock_data_dir(data_dir: Path):
    """One server per data dir: a second one would run the same jobs twice."""
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / "server.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise CliploomError(f"another cliploom server is using {data_dir}", "stop it, or pass another --data-dir") from None
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def parse_models(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or ["builtin=builtin"]:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = (Path(item).name or item), item
        from .forms import NAME

        if not NAME.match(name):
            raise CliploomError(f"--model {item!r}: {name!r} is not a usable name", "use NAME=PATH with NAME of letters, digits, . _ -")
        if name in out:
            raise CliploomError(f"--model {name} is given twice", "give each model its own name")
        out[name] = path
    return out


def build_server(data_dir: Path, models: dict[str, str], *, lora_dir: str | None = None, token: str | None = None,
                 max_queue: int = 32, max_clips: int = 500, device: str | None = None, workers: int = 1,
                 start_workers: bool = True, ray: dict | None = None):
    """The app with its store, loaded models and running worker(s): what ``cliploom serve`` runs,
    and what tests run in a thread. With ``ray`` (``{"address", "replicas", "cpus_per_replica",
    "gpus_per_replica"}``) the models load in Ray replicas instead (serve.replicas), and
    ``state.replicas`` is the loop that hands them jobs (run it, or start it in a thread)."""
    from ..engine import Engine
    from .api import ModelEntry, ServerState, create_app
    from .forms import Limits
    from .jobs import JobStore
    from .worker import Worker

    data_dir = Path(data_dir).expanduser().resolve()
    lock = lock_data_dir(data_dir)
    lora = Path(lora_dir).expanduser().resolve() if lora_dir else None
    if lora is not None and not lora.is_dir():
        raise CliploomError(f"--lora-dir {lora} is not a folder", "pass a folder of .safetensors LoRAs")
    store = JobStore(data_dir / "jobs.db")
    store.requeue_stale(0)  # we hold the lock: every in_progress job's worker is gone
    replicas = None
    if ray is not None:
        from .replicas import RayReplicas

        replicas = RayReplicas(store, data_dir, dict(models), device=device, **ray)
        try:
            settings = replicas.wait_ready()
        except BaseException:
            replicas.shutdown()
            lock.close()
            raise
        entries = {name: ModelEntry(name, None, settings[name]) for name in models}
    else:
        entries = {name: ModelEntry(name, Engine.load(path, device=device)) for name, path in models.items()}
    state = ServerState(store=store, data_dir=data_dir, models=entries, lora_dir=lora, token=token,
                        limits=Limits(max_queue=max_queue, max_clips=max_clips))
    if replicas is not None:
        state.workers, state.replicas = replicas.handles, replicas
        if start_workers:
            threading.Thread(target=replicas.run, name="ray-replicas", daemon=True).start()
    else:
        engines = {name: e.engine for name, e in entries.items()}
        state.workers = [Worker(store, engines, state.jobs_dir, name=f"worker-{i}") for i in range(workers)]
        if start_workers:
            for w in state.workers:
                w.start()
    app = create_app(state)
    app.lock = lock  # held as long as the app lives
    return app, state


def add_command(sub) -> None:
    p = sub.add_parser("serve", help="serve long-video jobs over HTTP (OpenAI videos API, web page)",
                       description="Serve long-video jobs: OpenAI's videos API on /v1, a web page on /. "
                       "See docs/serve.md.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", default="./cliploom-data", help="job store (SQLite), job folders")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="a model to serve (repeatable); default builtin=builtin")
    p.add_argument("--lora-dir", help="folder of LoRAs that requests may name")
    p.add_argument("--token", default=os.environ.get("CLIPLOOM_TOKEN"),
                   help="Bearer token for /v1 (default $CLIPLOOM_TOKEN); required off loopback")
    p.add_argument("--max-queue", type=int, default=32, help="queued videos before 429")
    p.add_argument("--max-clips", type=int, default=500, help="clips per video")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="generate in Ray replicas: a local Ray, or the cluster at ADDRESS (auto, ray://host:10001); "
                   "see docs/scale.md")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: generation replicas (one per GPU)")
    p.add_argument("--cpus-per-replica", type=float, help="with --ray: CPUs per replica (CPU-only clusters; default 1)")
    p.add_argument("--gpus-per-replica", type=float, help="with --ray: GPUs per replica (default 1 when the cluster has GPUs)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    import signal
    import threading

    import uvicorn

    if not args.token and not is_loopback(args.host):
        raise CliploomError(f"refusing to listen on {args.host} without a token",
                            "pass --token (or set CLIPLOOM_TOKEN), or listen on 127.0.0.1")
    if args.max_queue < 1 or args.max_clips < 1:
        raise CliploomError("--max-queue and --max-clips must be at least 1", "use e.g. --max-queue 32")
    if threads := os.environ.get("CLIPLOOM_THREADS"):
        import torch

        torch.set_num_threads(int(threads))
    ray = None
    if args.ray is not None:
        ray = {"address": args.ray, "replicas": args.replicas, "cpus_per_replica": args.cpus_per_replica,
               "gpus_per_replica": args.gpus_per_replica}
    elif args.replicas != 1 or args.cpus_per_replica or args.gpus_per_replica:
        raise CliploomError("--replicas, --cpus-per-replica and --gpus-per-replica need --ray", "add --ray")
    app, state = build_server(Path(args.data_dir), parse_models(args.model), lora_dir=args.lora_dir, token=args.token,
                              max_queue=args.max_queue, max_clips=args.max_clips, device=args.device,
                              start_workers=False, ray=ray)
    # HTTP in a thread, generation in the main thread: torch's CPU thread pool keeps its threads
    # spinning between ops only for the thread that created it, and a job run from another thread
    # took 1.7x as long on the built-in model (docs/serve.md).
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    http = threading.Thread(target=server.run, name="http", daemon=True)
    http.start()
    while not server.started:
        if not http.is_alive():
            raise CliploomError(f"cannot listen on {args.host}:{args.port}", "is the port in use? pass another --port")
        http.join(0.05)
    print(f"cliploom serving {', '.join(state.models)} on http://{args.host}:{args.port} (data in {state.data_dir})",
          flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt()

    signal.signal(signal.SIGTERM, stop)
    worker = state.replicas or state.workers[0]
    try:
        worker.run()  # until interrupted; a job cut short stays in_progress and resumes at the next start
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(10)
    return 0
