"""Scale-out benchmark (issue 14): throughput of Ray replicas, latency of sequence parallelism.

    python benchmarks/bench_scale.py                 # both CPU parts (make bench-scale)
    python benchmarks/bench_scale.py --gpu           # full-size Wan 2.1 14B shapes: 1 GPU vs all GPUs

(a) ``cliploom serve --ray --replicas N --cpus-per-replica 1`` with the built-in model, N = 1 and 2,
    each server in its own process on a local Ray: 8 jobs of 3 clips posted at once through the
    HTTP API, wall time from the first post to the last completion; throughput ratio 2 vs 1 (the
    median of 3 alternating pairs: a 2-core machine is noisy).
(b) ``cliploom generate --parallel ulysses=2`` under torchrun (gloo, one thread per process) vs one
    process (one thread) on the built-in model: seconds per clip from the run reports.
(c) ``--gpu``: the full-size Wan 2.1 I2V 14B shapes with random weights (benchmarks/bench_fullsize.py
    writes them), one 81-frame 480x832 clip, 4 steps, guidance 1, on 1 GPU and under
    ``torchrun --nproc_per_node <all GPUs> ... --parallel ulysses=<all GPUs>``.

Results: benchmarks/results/scale.json; docs/benchmarks.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PROMPT = "a big red circle moves right on a navy background"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(threads: int = 1) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads), "CLIPLOOM_THREADS": str(threads),
            "PYTHONUNBUFFERED": "1"}


def throughput(replicas: int, jobs: int, clips: int, tmp: Path) -> dict:
    port = _port()
    cmd = [sys.executable, "-m", "cliploom", "serve", "--port", str(port), "--data-dir", str(tmp / f"data{replicas}"),
           "--ray", "--replicas", str(replicas), "--cpus-per-replica", "1"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as h:
            deadline = time.monotonic() + 300
            while True:
                try:
                    health = h.get("/healthz").json()
                    if sum(w.get("state") == "ready" for w in health["workers"]) == replicas:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start: {proc.stdout.read() if proc.poll() is not None else ''}")
                time.sleep(0.2)
            t0 = time.perf_counter()
            ids = [h.post("/v1/videos", data={"prompt": PROMPT, "clips": str(clips), "seed": str(i)}).json()["id"]
                   for i in range(jobs)]
            while True:  # one list request per 0.2 s: the poller must not take the replicas' CPU
                listed = h.get("/v1/videos", params={"limit": 100}).json()["data"]
                if sum(v["status"] in ("completed", "failed") for v in listed if v["id"] in ids) == len(ids):
                    break
                time.sleep(0.2)
            seconds = time.perf_counter() - t0
            statuses = [h.get(f"/v1/videos/{i}").json()["status"] for i in ids]
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {"replicas": replicas, "jobs": jobs, "clips_per_job": clips, "seconds": round(seconds, 2),
            "jobs_per_minute": round(60 * jobs / seconds, 2), "completed": statuses.count("completed")}


def ulysses(procs: int, clips: int, tmp: Path, model: str = "builtin", extra=()) -> dict:
    from cliploom.shapesworld import render_reference

    ref = tmp / "ref.png"
    render_reference(PROMPT, size=64).save(ref)
    out = tmp / f"ulysses{procs}.mp4"
    base = ["-m", "cliploom", "generate", "--model", model, "--image", str(ref), "--prompt", PROMPT, "--clips",
            str(clips), "--out", str(out), "--overwrite", "--quiet", *extra]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), *base,
               "--parallel", f"ulysses={procs}"]
    else:
        cmd = [sys.executable, *base]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    report = json.loads(out.with_suffix(".json").read_text())
    per_clip = [c["seconds_denoise"] + c["seconds_decode"] for c in report["clips"]]
    return {"processes": procs, "clips": clips, "seconds_per_clip": round(sum(per_clip[1:]) / max(1, len(per_clip) - 1), 3),
            "seconds_denoise_per_clip": round(sum(c["seconds_denoise"] for c in report["clips"][1:]) / max(1, clips - 1), 3)}


def gpu(tmp: Path) -> list[dict]:
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_fullsize as F

    n = torch.cuda.device_count()
    family = F.family_config("wan21-i2v-14b-480p", tiny=False)
    folder = tmp / "wan21"
    wrote = F.write_model(folder, family)
    rows = []
    for procs in sorted({1, n}):
        extra = ["--family", wrote["family_file"], "--frames", "81", "--width", "832", "--height", "480", "--steps", "4",
                 "--guidance", "1", "--motion-latents", "1", "--weights", "bf16"]
        rows.append({**ulysses(procs, 2, tmp, model=str(folder), extra=extra), "gpus": procs,
                     "device": torch.cuda.get_device_name(0)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="(c): full-size shapes on 1 GPU vs all GPUs")
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--clips", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="(a): 1-vs-2 pairs; the median ratio is reported")
    ap.add_argument("--out", default=str(RESULTS / "scale.json"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.gpu:
            result = {"gpu": gpu(tmp)}
        else:
            runs = []
            for r in range(args.repeats):  # alternating, so drift on the machine hits both alike
                one = throughput(1, args.jobs, args.clips, tmp / f"r{r}")
                two = throughput(2, args.jobs, args.clips, tmp / f"r{r}")
                runs.append({"one": one, "two": two, "ratio": round(one["seconds"] / two["seconds"], 2)})
                print(json.dumps(runs[-1]), flush=True)
            u1 = ulysses(1, 4, tmp)
            print(json.dumps(u1), flush=True)
            u2 = ulysses(2, 4, tmp)
            print(json.dumps(u2), flush=True)
            ratios = sorted(r["ratio"] for r in runs)
            result = {"throughput": runs, "throughput_ratio": ratios[len(ratios) // 2],  # the median repeat
                      "ulysses": [u1, u2], "ulysses_slowdown": round(u2["seconds_per_clip"] / u1["seconds_per_clip"], 2)}
    result["meta"] = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "command": "bench_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.endswith(("ratio", "slowdown"))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
