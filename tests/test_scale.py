"""Scale-out on Ray (issue 14): ``cliploom serve --ray`` with two CPU replicas of the built-in
model on a local Ray (``ray.init(num_cpus=2)``): jobs complete, no replica runs two at once, a
replica killed mid-job loses nothing (its job finishes on the other replica with the frames of an
uninterrupted run), a replica that cannot load its model is reported and gets no jobs."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'cliploom[ray]')")

from test_serve import PROMPT, ThreadServer, http, wait  # noqa: E402

from cliploom.video_io import read_video  # noqa: E402
from compare import assert_frames_close  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_server(local_ray, tmp_path_factory):
    srv = ThreadServer(tmp_path_factory.mktemp("ray-serve"), ray={"replicas": 2, "cpus_per_replica": 1})
    yield srv
    srv.state.replicas.shutdown()
    srv.close()


def _events(client, video_id) -> list[dict]:
    out = []
    with client.stream("GET", f"/v1/videos/{video_id}/events") as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
    return out


def test_jobs_spread_over_replicas_one_at_a_time(ray_server):
    replicas = ray_server.state.replicas
    deadline = time.monotonic() + 120  # the server answers once one replica is ready; wait for both
    while [h.state for h in replicas.handles] != ["ready", "ready"]:
        assert time.monotonic() < deadline, replicas.handles
        time.sleep(0.1)
    with http(ray_server, token=None) as h:
        health = h.get("/healthz").json()
        assert {w["name"] for w in health["workers"]} == {"replica-0", "replica-1"}
        assert all(w["state"] == "ready" and w["pid"] for w in health["workers"])
        ids = [h.post("/v1/videos", data={"prompt": PROMPT, "clips": "2", "seed": str(i)}).json()["id"] for i in range(4)]
        done = [wait(h, i, timeout=300) for i in ids]
        assert all(v["status"] == "completed" for v in done)
        ran_on = [next(e["worker"] for e in _events(h, i) if e["type"] == "started") for i in ids]
    assert set(ran_on) == {"replica-0", "replica-1"}  # both replicas worked
    info = replicas.replica_info()
    assert len(info) == 2 and all(i["most_running"] == 1 for i in info)  # never two jobs at once
    assert len({i["pid"] for i in info}) == 2


def test_a_replica_killed_mid_job_loses_nothing(ray_server):
    replicas = ray_server.state.replicas
    story = json.dumps({"seed": 5, "clips": [PROMPT, "a big red circle moves left on a navy background"] * 2})
    with http(ray_server, token=None) as h:
        reference = wait(h, h.post("/v1/videos", data={"prompt": PROMPT, "story": story}).json()["id"], timeout=300)
        victim = h.post("/v1/videos", data={"prompt": PROMPT, "story": story}).json()["id"]
        deadline = time.monotonic() + 300
        while h.get(f"/v1/videos/{victim}").json()["clips_done"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        handle = next(x for x in replicas.handles if x.current == victim)
        os.kill(handle.pid, signal.SIGKILL)  # the replica's process, mid-job
        done = wait(h, victim, timeout=300)
        assert done["status"] == "completed" and done["clips_done"] == 4
        events = _events(h, victim)
        report = h.get(f"/v1/videos/{victim}/report").json()["report"]
        videos = [h.get(f"/v1/videos/{v}/content").content for v in (victim, reference["id"])]
    started = [e["worker"] for e in events if e["type"] == "started"]
    assert "requeued" in [e["type"] for e in events]
    assert started[0] == handle.name and started[-1] != handle.name  # finished on the other replica
    assert report["resumed_at_clip"] >= 1  # from the dead replica's last finished clip
    frames = []
    for i, content in enumerate(videos):
        path = ray_server.state.data_dir / f"cmp{i}.mp4"
        path.write_bytes(content)
        frames.append(torch.from_numpy(read_video(path)))
    assert frames[0].shape == frames[1].shape
    # two replica processes, one thread each, same machine: the same path, compared with the suite's
    # cross-process frame tolerance (tests/compare.py)
    assert_frames_close(frames[0], frames[1])
    # Ray restarts the dead replica, which rejoins once its model is loaded
    deadline = time.monotonic() + 120
    while handle.state != "ready":
        assert time.monotonic() < deadline, handle
        time.sleep(0.2)
    assert handle.restarts >= 1


def test_cancel_reaches_the_replica_running_the_job(ray_server):
    with http(ray_server, token=None) as h:
        long = h.post("/v1/videos", data={"prompt": PROMPT, "clips": "30"}).json()["id"]
        while h.get(f"/v1/videos/{long}").json()["progress"] < 3:
            time.sleep(0.05)
        assert h.delete(f"/v1/videos/{long}").json()["deleted"]
        deadline = time.monotonic() + 60
        while h.get(f"/v1/videos/{long}").status_code != 404:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert not (ray_server.state.jobs_dir / long).exists()
    # the replica removes the job from the store and then returns; the dispatcher frees the replica when it
    # collects that return (ray.wait), a moment after the 404: wait for it, as for the 404
    while not all(x.current != long for x in ray_server.state.replicas.handles):
        assert time.monotonic() < deadline, [x.current for x in ray_server.state.replicas.handles]
        time.sleep(0.1)


def test_a_replica_that_cannot_load_reports_it_and_jobs_wait(local_ray, tmp_path):
    from cliploom.errors import CliploomError
    from cliploom.serve import build_server

    with pytest.raises(CliploomError, match="no replica could load the models: .*nowhere"):
        build_server(tmp_path / "d", {"builtin": str(tmp_path / "nowhere")}, ray={"replicas": 1, "cpus_per_replica": 0})
