"""``cliploom serve``: the official ``openai`` client against a real server on 127.0.0.1 with the
built-in model; resume after SIGKILL; cancel; limits; errors in OpenAI's shape."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest

from cliploom.runs import Run
from cliploom.video_io import read_video

TOKEN = "test-token-123"
PROMPT = "a big red circle moves right on a navy background"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """The app of ``cliploom serve`` under uvicorn in a daemon thread."""

    def __init__(self, data_dir: Path, **kw):
        import uvicorn

        from cliploom.serve import build_server

        self.app, self.state = build_server(data_dir, {"builtin": "builtin"}, **kw)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        for w in self.state.workers:
            w.stop()
            if w.is_alive():
                w.join(30)
        self.app.lock.close()


def http(server, token=TOKEN) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"} if token else {}, timeout=60)


def wait(client, video_id, until=("completed", "failed"), timeout=120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        video = client.get(f"/v1/videos/{video_id}").json()
        if video["status"] in until:
            return video
        time.sleep(0.1)
    raise AssertionError(f"{video_id} still {video['status']} after {timeout} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ThreadServer(tmp_path_factory.mktemp("serve"), token=TOKEN)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def openai_client(server):
    openai = pytest.importorskip("openai")
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # the SDK marks its videos API deprecated
    return openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0)


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory):
    from cliploom.shapesworld import render_reference

    path = tmp_path_factory.mktemp("ref") / "ref.png"
    render_reference(PROMPT, size=32).save(path)
    return path


def test_openai_client_creates_polls_downloads_lists_extends_and_deletes(server, openai_client, reference_file, tmp_path):
    client = openai_client
    with open(reference_file, "rb") as f:
        video = client.videos.create(prompt=PROMPT, seconds="2", input_reference=f)
    assert video.status in ("queued", "in_progress") and video.object == "video"  # the worker may already have it
    done = client.videos.poll(video.id, poll_interval_ms=100)
    assert done.status == "completed" and done.progress == 100
    raw = done.model_dump()
    # 2 s at 16 fps = 32 frames: 17 + 12 + 12 = 41 frames in 3 clips of the built-in model (K = 1)
    assert raw["clips_total"] == raw["clips_done"] == 3 and done.size == "32x32"
    content = client.videos.download_content(done.id)
    path = tmp_path / "v.mp4"
    content.write_to_file(path)
    frames = read_video(path)
    assert frames.shape == (41, 32, 32, 3) and float(done.seconds) == pytest.approx(41 / 16)
    import av

    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        assert float(stream.duration * stream.time_base) == pytest.approx(41 / 16, abs=1 / 16)
    assert client.videos.retrieve(done.id).id == done.id
    page = client.videos.list(limit=10)
    assert done.id in [v.id for v in page.data]
    thumb = client.videos.download_content(done.id, variant="thumbnail").read()
    assert thumb[:8] == b"\x89PNG\r\n\x1a\n"

    # Extend by id with a plain HTTP call (a multipart form as OpenAI encodes a reference object).
    with http(server) as h:
        r = h.post("/v1/videos/extensions", data={"prompt": "a big red circle moves left on a navy background",
                                                  "seconds": "1", "video[id]": done.id})
        assert r.status_code == 200, r.text
        ext = wait(h, r.json()["id"])
        assert ext["status"] == "completed" and ext["remixed_from_video_id"] == done.id
        (tmp_path / "ext.mp4").write_bytes(h.get(f"/v1/videos/{ext['id']}/content").content)
    extended = read_video(tmp_path / "ext.mp4")
    assert len(extended) == 41 + 2 * 12
    # the old clips are kept byte for byte: their frames decode identically
    assert np.array_equal(extended[:41], frames)

    # Extend an uploaded file through the client: continued from its last frames (pixel motion).
    with open(path, "rb") as f:
        up = client.videos.extend(prompt="a big red circle moves up on a navy background", seconds="1", video=f)
    up = client.videos.poll(up.id, poll_interval_ms=100)
    assert up.status == "completed", up.error
    assert up.model_dump()["clips_total"] == 3  # the upload, then two 12-frame svi2 clips cover 1 s

    deleted = client.videos.delete(done.id)
    assert deleted.deleted and deleted.id == done.id
    assert not (server.state.jobs_dir / done.id).exists()
    import openai

    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(done.id)


def test_the_extension_continues_exactly_as_an_uninterrupted_story(server):
    """The first new clip of an extension is the clip the longer story would have made next."""
    with http(server) as h:
        story = {"seed": 5, "clips": [PROMPT, PROMPT]}
        a = wait(h, h.post("/v1/videos", data={"prompt": PROMPT, "story": json.dumps(story)}).json()["id"])
        b = h.post("/v1/videos/extensions", json={"video": {"id": a["id"]}, "prompts": ["a big red circle moves left on a navy background"]}).json()
        b = wait(h, b["id"])
        whole = {"seed": 5, "clips": [PROMPT, PROMPT, "a big red circle moves left on a navy background"]}
        c = wait(h, h.post("/v1/videos", data={"prompt": PROMPT, "story": json.dumps(whole)}).json()["id"])
    jobs = server.state.jobs_dir
    # same machine, same path: the new clip's segment is the same clip (frames compared exactly)
    seg_b = read_video(jobs / b["id"] / "video.run" / "clips" / "000002.mp4")
    seg_c = read_video(jobs / c["id"] / "video.run" / "clips" / "000002.mp4")
    assert np.array_equal(seg_b, seg_c)


def test_an_uploaded_video_extends_in_pro_mode_from_its_last_frames_encoded(server, tmp_path):
    """``mode: pro`` on an uploaded file (the built-in model's ``memory_from: frames``): its last clip's
    worth of frames, encoded as the loop encodes a decoded clip, is the motion memory, its last frame
    the next anchor; the upload is kept whole and the new clips follow it. Without ``memory_from:
    frames`` there are no motion latents to continue from: refused in one line."""
    import torch
    from safetensors.torch import load_file

    from cliploom.loom import encode_memory
    from cliploom.video_io import write_mp4

    frames = np.full((20, 32, 32, 3), (20, 30, 90), np.uint8)  # a red square moving right on navy
    for t in range(20):
        frames[t, 12:20, 4 + t : 12 + t] = (220, 40, 40)
    write_mp4(tmp_path / "up.mp4", frames, 16)
    upload = {"video": ("up.mp4", (tmp_path / "up.mp4").read_bytes(), "video/mp4")}
    with http(server) as h:
        r = h.post("/v1/videos/extensions", files=upload, data={
            "prompt": "a red square moves up on a navy background", "seconds": "1",
            "story": json.dumps({"mode": "pro", "memory_from": "latents"})})
        assert r.status_code == 400 and "memory_from: frames" in r.json()["error"]["message"]
        r = h.post("/v1/videos/extensions", files=upload, data={
            "prompt": "a red square moves up on a navy background", "seconds": "1", "story": json.dumps({"mode": "pro"})})
        assert r.status_code == 200, r.text
        video = wait(h, r.json()["id"])
        assert video["status"] == "completed", video.get("error")
        content = h.get(f"/v1/videos/{video['id']}/content").content
    (tmp_path / "out.mp4").write_bytes(content)
    out = read_video(tmp_path / "out.mp4")
    assert video["clips_total"] == 3 and len(out) == 20 + 2 * 12  # the whole upload, then two pro clips of 12 frames
    uploaded = read_video(tmp_path / "up.mp4")
    # the upload's frames come back after one more H.264 round trip: near, not equal (crf 12 moves a few levels)
    assert np.abs(out[:20].astype(int) - uploaded.astype(int)).mean() < 3
    run = server.state.jobs_dir / video["id"] / "video.run" / "clips"
    kept = load_file(str(run / "000000.memory.safetensors"))
    model = server.state.workers[0].engines["builtin"].model
    fitted = read_video(server.state.jobs_dir / video["id"] / "upload.mp4")  # 32x32 already: cover_crop keeps it
    # the same function of the same frames, run here and on the worker's thread: equal to float rounding
    assert torch.allclose(kept["memory"], encode_memory(model, torch.as_tensor(fitted[-17:]), 1).cpu(), atol=1e-4)
    # uint8 pixels of the same file through the same decoder (H.264 decoding is bit-exact by the standard)
    assert torch.equal(kept["anchor_next"], torch.as_tensor(fitted[-1]))


def test_auth_errors_and_limits(server, reference_file):
    with http(server, token=None) as anon:
        r = anon.get("/v1/videos")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert anon.get("/healthz").status_code == 200
    with http(server, token="wrong") as bad:
        assert bad.post("/v1/videos", data={"prompt": PROMPT}).status_code == 401
    with http(server) as h:
        r = h.post("/v1/videos", data={"prompt": PROMPT, "story": "frames: 10"})
        err = r.json()["error"]
        assert r.status_code == 400 and "frames 10 is not of the form 4k+1" in err["message"] and "\n" not in err["message"]
        r = h.post("/v1/videos", data={"prompt": PROMPT, "story": "reference: /etc/passwd"})
        assert r.status_code == 400 and "`reference` cannot be set by a request" in r.json()["error"]["message"]
        r = h.post("/v1/videos", data={"prompt": PROMPT, "story": "loras: [{path: ../../x}]"})
        assert r.status_code == 400 and "not a LoRA name" in r.json()["error"]["message"]
        r = h.post("/v1/videos", data={"prompt": "draw a cat"})
        assert r.status_code == 400 and "input_reference" in r.json()["error"]["message"]
        r = h.post("/v1/videos", data={"prompt": PROMPT, "size": "33x32"})
        assert r.status_code == 400 and "width 33" in r.json()["error"]["message"]
        r = h.post("/v1/videos", data={"prompt": PROMPT, "seconds": "99999"})
        assert r.status_code == 400 and "more than this server's" in r.json()["error"]["message"]
        r = h.post("/v1/videos", data={"prompt": PROMPT}, files={"input_reference": ("x.png", b"not an image")})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input_reference"
        r = h.post("/v1/videos", content=b"x" * (26 * 2**20), headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert h.get("/v1/videos/video_nope").status_code == 404
        assert h.get("/v1/videos/video_nope/content").json()["error"]["code"] == "video_not_found"
        assert h.post("/v1/videos", data={"prompt": PROMPT, "model": "wan3"}).json()["error"]["code"] == "model_not_found"
        assert [m["id"] for m in h.get("/v1/models").json()["data"]] == ["builtin"]


def test_queue_full_is_429_and_content_of_a_queued_video_is_409(tmp_path):
    srv = ThreadServer(tmp_path / "d", max_queue=1, start_workers=False)  # nothing runs: the queue fills
    try:
        with http(srv, token=None) as h:
            first = h.post("/v1/videos", data={"prompt": PROMPT})
            assert first.status_code == 200 and first.json()["status"] == "queued"
            assert h.get(f"/v1/videos/{first.json()['id']}/content").status_code == 409
            assert h.get(f"/v1/videos/{first.json()['id']}/clips/0").status_code == 409
            full = h.post("/v1/videos", data={"prompt": PROMPT})
            assert full.status_code == 429 and full.headers["Retry-After"] and full.json()["error"]["code"] == "queue_full"
            assert len(h.get("/v1/videos").json()["data"]) == 1  # none half-created
            # a queued video that is deleted never starts, and its folder goes
            assert h.delete(f"/v1/videos/{first.json()['id']}").json()["deleted"]
            assert not list((tmp_path / "d" / "jobs").iterdir())
    finally:
        srv.close()


def test_cancel_stops_a_running_job_at_a_step_and_frees_the_worker(server):
    worker = server.state.workers[0]
    with http(server) as h:
        long = h.post("/v1/videos", data={"prompt": PROMPT, "clips": "40"}).json()
        after = h.post("/v1/videos", data={"prompt": PROMPT, "clips": "1"}).json()
        wait(h, long["id"], until=("in_progress",))
        while h.get(f"/v1/videos/{long['id']}").json()["progress"] < 5:
            time.sleep(0.05)
        assert h.delete(f"/v1/videos/{long['id']}").json()["deleted"]
        done = wait(h, after["id"])  # the worker went on to the next job
        assert done["status"] == "completed"
        assert h.get(f"/v1/videos/{long['id']}").status_code == 404
    assert worker.cancelled_at["job"] == long["id"] and worker.cancelled_at["clip"] < 39  # stopped mid-video
    assert not (server.state.jobs_dir / long["id"]).exists()


def test_events_stream_reports_progress_and_clip_urls(server):
    with http(server) as h:
        v = h.post("/v1/videos", data={"prompt": PROMPT, "clips": "2"}).json()
        kinds, urls = [], []
        with h.stream("GET", f"/v1/videos/{v['id']}/events") as s:
            for line in s.iter_lines():
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    kinds.append(event["type"])
                    if event["type"] == "clip_done":
                        urls.append(event["url"])
        assert kinds[0] == "queued" and kinds[-1] == "completed" and "started" in kinds and "step" in kinds
        assert urls == [f"/v1/videos/{v['id']}/clips/0", f"/v1/videos/{v['id']}/clips/1"]
        clip = h.get(urls[0])
        assert clip.status_code == 200 and clip.headers["content-type"] == "video/mp4"
        report = h.get(f"/v1/videos/{v['id']}/report").json()
        assert report["report"]["totals"]["clips"] == 2 and report["evaluation"]["num_clips"] == 2


# -- crash and resume: a real server process, killed -------------------------------------------------


def _start(data_dir: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "CLIPLOOM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cliploom.cli", "serve", "--port", str(port), "--data-dir",
                             str(data_dir)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not start")


def test_sigkill_mid_job_then_restart_resumes_from_the_last_clip(tmp_path):
    data, port = tmp_path / "data", free_port()
    story = json.dumps({"seed": 9, "clips": [PROMPT, "a big red circle moves left on a navy background"] * 4})
    proc = _start(data, port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as h:
            victim = h.post("/v1/videos", data={"prompt": PROMPT, "story": story}).json()["id"]
            waiting = h.post("/v1/videos", data={"prompt": PROMPT, "clips": "2"}).json()["id"]
            while h.get(f"/v1/videos/{victim}").json()["clips_done"] < 3:
                time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    run = Run(data / "jobs" / victim / "video.run")
    kept = len(run.saved())
    assert 3 <= kept < 8
    # A crash mid-write leaves *.partial files at most; they are never read.
    (run.clips_dir / f"{kept:06d}.json.partial").write_text("{")

    proc = _start(data, port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as h:
            assert h.get(f"/v1/videos/{waiting}").json()["status"] in ("queued", "in_progress", "completed")
            resumed = wait(h, victim)
            assert resumed["status"] == "completed" and resumed["clips_done"] == 8
            assert wait(h, waiting)["status"] == "completed"
            fresh = wait(h, h.post("/v1/videos", data={"prompt": PROMPT, "story": story}).json()["id"])
            report = h.get(f"/v1/videos/{victim}/report").json()["report"]
            videos = [h.get(f"/v1/videos/{v}/content").content for v in (victim, fresh["id"])]
            listed = h.get("/v1/videos").json()["data"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert report["resumed_at_clip"] == kept
    assert sum(1 for v in listed if v["status"] == "completed") == 3 == len(listed)  # each job once, none lost
    for i, content in enumerate(videos):
        (tmp_path / f"{i}.mp4").write_bytes(content)
    # same machine, same server path: the resumed video's frames equal the uninterrupted one's
    assert np.array_equal(read_video(tmp_path / "0.mp4"), read_video(tmp_path / "1.mp4"))


def test_serve_refuses_to_listen_off_loopback_without_a_token(capsys):
    from cliploom.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--token", ""]) == 2
    assert "without a token" in capsys.readouterr().err


def test_rerun_from_a_clip_keeps_the_clips_before_it(server):
    with http(server) as h:
        story = {"seed": 4, "clips": [PROMPT, PROMPT, PROMPT]}
        a = wait(h, h.post("/v1/videos", data={"prompt": PROMPT, "story": json.dumps(story)}).json()["id"])
        r = h.post(f"/v1/videos/{a['id']}/rerun",
                   json={"from_clip": 1, "story": {"clips": [{"prompt": "a big red circle moves up on a navy background", "seed": 77}]}})
        assert r.status_code == 200, r.text
        b = wait(h, r.json()["id"])
        assert b["status"] == "completed" and b["clips_total"] == 2
        report = h.get(f"/v1/videos/{b['id']}/report").json()["report"]
        assert [c["seed"] for c in report["clips"]][1] == 77 and report["resumed_at_clip"] == 1
        assert h.post(f"/v1/videos/{a['id']}/rerun", json={"from_clip": 9}).status_code == 400
    jobs = server.state.jobs_dir
    # clip 0 is the very segment of the first video (kept byte for byte)
    assert (jobs / a["id"] / "video.run/clips/000000.mp4").read_bytes() == (jobs / b["id"] / "video.run/clips/000000.mp4").read_bytes()


def test_route_jobs_run_through_the_service_unchanged(server):
    """A story's route and options go through the API as story keys; the built-in model's route
    LoRAs are used; the report names the route; a bad option is refused up front."""
    with http(server) as h:
        for route, options in (("causal", {"window": 1}), ("df", {"addnoise": 20})):
            story = {"seed": 3, "clips": [PROMPT, "a big red circle moves left on a navy background"],
                     "route": route, "route_options": options}
            v = wait(h, h.post("/v1/videos", data={"prompt": PROMPT, "story": json.dumps(story)}).json()["id"])
            assert v["status"] == "completed", v
            report = h.get(f"/v1/videos/{v['id']}/report").json()["report"]
            assert report["story"]["route"] == route
            assert options.items() <= report["story"]["route_options"].items()  # with the other options' defaults
            assert any(route in lora["path"] for lora in report["story"]["loras"])  # the model's route LoRA
            assert report["totals"]["clips"] == 2
        bad = {"clips": [PROMPT], "route": "causal", "route_options": {"window": 99}}
        r = h.post("/v1/videos", data={"prompt": PROMPT, "story": json.dumps(bad)})
        assert r.status_code == 400 and "window 99 is out of range" in r.text
