"""Serving benchmark (``make bench-serve``): a real ``cliploom serve`` process with the built-in model.

1. Burst: 50 concurrent creates against ``--max-queue 20``: every accepted job completes exactly
   once, the rest get 429, none is lost or duplicated.
2. Status latency: ``GET /v1/videos/{id}`` p50 / p99 while a job runs (generation must not block
   the event loop; target p99 < 100 ms).
3. First clip: time from POST to the first clip's ``clip_done`` event, over one clip's own
   generation time from the report (target <= 1.5x).
4. Whole job: POST to ``completed`` through the server, over ``cliploom generate`` of the same
   story (its wall time without model loading; target <= 1.1x).

Writes benchmarks/results/serve.json and prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a big red circle moves right on a navy background"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data: Path, port: int, max_queue: int, threads: str) -> subprocess.Popen:
    env = {**os.environ, "CLIPLOOM_THREADS": threads}
    proc = subprocess.Popen([sys.executable, "-m", "cliploom.cli", "serve", "--port", str(port), "--data-dir", str(data),
                             "--max-queue", str(max_queue)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start")


def wait(client: httpx.Client, vid: str, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = client.get(f"/v1/videos/{vid}").json()
        if v["status"] in ("completed", "failed"):
            return v
        time.sleep(0.05)
    raise SystemExit(f"{vid} did not finish")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def burst(base: str, n: int) -> dict:
    results: list = [None] * n

    def one(i: int) -> None:
        with httpx.Client(base_url=base, timeout=120) as c:
            r = c.post("/v1/videos", data={"prompt": PROMPT, "clips": "1", "seed": str(i)})
            results[i] = (r.status_code, r.json().get("id"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    accepted = [vid for code, vid in results if code == 200]
    refused = sum(1 for code, _ in results if code == 429)
    with httpx.Client(base_url=base, timeout=120) as c:
        finals = [wait(c, vid) for vid in accepted]
        listed = []
        after = None
        while True:
            page = c.get("/v1/videos", params={"limit": 100, **({"after": after} if after else {})}).json()
            listed += [v["id"] for v in page["data"]]
            if not page["has_more"]:
                break
            after = page["last_id"]
        completed_events = {}
        for vid in accepted:
            text = c.get(f"/v1/videos/{vid}/events", timeout=30).text
            completed_events[vid] = text.count("event: completed")
    return {
        "requests": n, "accepted": len(accepted), "refused_429": refused,
        "other_status": n - len(accepted) - refused,
        "completed": sum(1 for v in finals if v["status"] == "completed"),
        "lost": len(set(accepted) - set(listed)), "duplicated_ids": len(accepted) - len(set(accepted)),
        "completed_twice": sum(1 for k in completed_events.values() if k != 1),
        "seconds": round(time.perf_counter() - started, 2),
    }


def status_latency(base: str, clips: int, polls: int) -> dict:
    with httpx.Client(base_url=base, timeout=30) as c:
        vid = c.post("/v1/videos", data={"prompt": PROMPT, "clips": str(clips)}).json()["id"]
        while c.get(f"/v1/videos/{vid}").json()["status"] != "in_progress":
            time.sleep(0.01)
        times = []
        for _ in range(polls):
            t = time.perf_counter()
            v = c.get(f"/v1/videos/{vid}").json()
            times.append(time.perf_counter() - t)
            if v["status"] != "in_progress":
                break
        final = wait(c, vid)
    ms = [1000 * t for t in times]
    return {"polls": len(ms), "p50_ms": round(percentile(ms, 0.5), 2), "p99_ms": round(percentile(ms, 0.99), 2),
            "max_ms": round(max(ms), 2), "job_status": final["status"]}


def first_clip(base: str, clips: int) -> dict:
    with httpx.Client(base_url=base, timeout=300) as c:
        t0 = time.perf_counter()
        vid = c.post("/v1/videos", data={"prompt": PROMPT, "clips": str(clips)}).json()["id"]
        first = None
        with c.stream("GET", f"/v1/videos/{vid}/events") as s:
            for line in s.iter_lines():
                if line.startswith("event: clip_done"):
                    first = time.perf_counter() - t0
                    break
        wait(c, vid)
        report = c.get(f"/v1/videos/{vid}/report").json()["report"]
    clip0 = report["clips"][0]
    one = clip0["seconds_denoise"] + clip0["seconds_decode"]
    return {"post_to_first_clip_s": round(first, 3), "one_clip_generation_s": round(one, 3),
            "ratio": round(first / one, 2)}


def cancel_latency(base: str, repeats: int = 10) -> dict:
    """DELETE of a running job at a random moment: until the worker stops it (its own clock,
    /healthz last_cancel) and until a client sees the worker free, against one step's time."""
    import random

    rng = random.Random(0)
    stopped, freed, where = [], [], []
    with httpx.Client(base_url=base, timeout=60) as c:
        for _ in range(repeats):
            vid = c.post("/v1/videos", data={"prompt": PROMPT, "clips": "40"}).json()["id"]
            while c.get(f"/v1/videos/{vid}").json()["status"] != "in_progress":
                time.sleep(0.01)
            time.sleep(rng.uniform(0.2, 0.8))
            t0 = time.time()
            c.delete(f"/v1/videos/{vid}")
            while True:
                worker = c.get("/healthz").json()["workers"][0]
                if worker["job"] != vid and (worker["last_cancel"] or {}).get("job") == vid:
                    break
                time.sleep(0.002)
            freed.append(time.time() - t0)
            stopped.append(worker["last_cancel"]["at"] - t0)
            where.append("step" if worker["last_cancel"]["step"] is not None else "after a decode")
        one = wait(c, c.post("/v1/videos", data={"prompt": PROMPT, "clips": "1"}).json()["id"])
        report = c.get(f"/v1/videos/{one['id']}/report").json()["report"]
    step = report["clips"][0]["seconds_denoise"] / report["story"]["steps"]
    at_step = [t for t, w in zip(stopped, where) if w == "step"]
    return {"stopped_median_s": round(statistics.median(stopped), 4), "stopped_max_s": round(max(stopped), 4),
            "stopped_at_a_step_max_s": round(max(at_step), 4) if at_step else None,
            "client_sees_free_median_s": round(statistics.median(freed), 4), "one_step_s": round(step, 4),
            "stopped_at": where}


def whole_job(base: str, clips: int, tmp: Path, threads: str, repeats: int = 3) -> dict:
    """Median of ``repeats`` runs each way; both sides warm (the server has run jobs before, the
    direct process renders a one-clip story first)."""
    story = {"seed": 1, "clips": [PROMPT] * clips}
    served = []
    with httpx.Client(base_url=base, timeout=300) as c:
        for _ in range(repeats):
            t0 = time.perf_counter()
            vid = c.post("/v1/videos", data={"prompt": PROMPT, "story": json.dumps(story)}).json()["id"]
            with c.stream("GET", f"/v1/videos/{vid}/events") as s:  # told at once, no polling
                for line in s.iter_lines():
                    if line.startswith("event: completed"):
                        break
            served.append(time.perf_counter() - t0)
    from cliploom.shapesworld import render_reference

    render_reference(PROMPT, size=32).save(tmp / "ref.png")
    (tmp / "s.yaml").write_text(json.dumps({**story, "reference": str(tmp / "ref.png")}))
    (tmp / "warm.yaml").write_text(json.dumps({**story, "clips": [PROMPT], "reference": str(tmp / "ref.png")}))
    env = {**os.environ, "CLIPLOOM_THREADS": threads}
    out = subprocess.run([sys.executable, "-c", (
        "import sys, time, torch, cliploom; torch.set_num_threads(int(sys.argv[4]));"
        "e = cliploom.Engine.load('builtin'); s = cliploom.load_story(sys.argv[1]);"
        "e.render(cliploom.load_story(sys.argv[2]), sys.argv[3], progress=False, overwrite=True)\n"
        "for _ in range(int(sys.argv[5])):\n"
        "    t = time.perf_counter(); e.render(s, sys.argv[3], progress=False, overwrite=True); print(time.perf_counter() - t)"),
        str(tmp / "s.yaml"), str(tmp / "warm.yaml"), str(tmp / "cli.mp4"), threads, str(repeats)],
        capture_output=True, text=True, env=env, check=True)
    direct = [float(x) for x in out.stdout.split()]
    s, d = statistics.median(served), statistics.median(direct)
    return {"clips": clips, "server_post_to_completed_s": round(s, 3), "generate_render_s": round(d, 3),
            "ratio": round(s / d, 3), "server_runs_s": [round(x, 3) for x in served],
            "render_runs_s": [round(x, 3) for x in direct]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--burst", type=int, default=50)
    ap.add_argument("--max-queue", type=int, default=20)
    ap.add_argument("--clips", type=int, default=20, help="clips of the latency / whole-job runs")
    ap.add_argument("--polls", type=int, default=500)
    ap.add_argument("--threads", default=os.environ.get("CLIPLOOM_THREADS", "2"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        port = free_port()
        proc = start_server(tmp / "data", port, args.max_queue, args.threads)
        base = f"http://127.0.0.1:{port}"
        try:
            results = {
                "burst": burst(base, args.burst),
                "status_latency": status_latency(base, args.clips, args.polls),
                "first_clip": first_clip(base, args.clips),
                "cancel": cancel_latency(base),
                "whole_job": whole_job(base, args.clips, tmp, args.threads),
                "machine": {"cpus": os.cpu_count(), "threads": args.threads},
            }
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    b, lat, fc, wj = results["burst"], results["status_latency"], results["first_clip"], results["whole_job"]
    cl = results["cancel"]
    print("| measure | value | target |\n|---|---|---|")
    print(f"| burst: {b['requests']} creates vs --max-queue {args.max_queue} | {b['accepted']} accepted, {b['refused_429']} x 429, "
          f"{b['completed']} completed, {b['lost']} lost, {b['completed_twice']} completed twice | all accepted complete once |")
    print(f"| GET status while a job runs ({lat['polls']} polls) | p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms | p99 < 100 ms |")
    print(f"| POST -> first clip / one clip's generation | {fc['post_to_first_clip_s']} s / {fc['one_clip_generation_s']} s = "
          f"{fc['ratio']}x | <= 1.5x |")
    print(f"| DELETE of a running job -> job stopped (server clock) | median {cl['stopped_median_s']} s, max "
          f"{cl['stopped_max_s']} s; one step {cl['one_step_s']} s; client sees the worker free after "
          f"{cl['client_sees_free_median_s']} s; {cl['stopped_at'].count('step')}/{len(cl['stopped_at'])} stopped at a "
          f"step (max {cl['stopped_at_a_step_max_s']} s), the rest after the clip's VAE decode | within one step |")
    print(f"| {wj['clips']}-clip job: server POST -> completed / Engine.render | {wj['server_post_to_completed_s']} s / "
          f"{wj['generate_render_s']} s = {wj['ratio']}x | <= 1.1x |")
    return results


if __name__ == "__main__":
    main()
