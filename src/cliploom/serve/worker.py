"""The worker: takes the oldest queued job, runs it through ``Engine.render`` and keeps the job
store up to date. One worker per device; the models it serves are loaded once and stay loaded.

A job's folder (``DATA/jobs/<id>/``) holds what the job needs and makes:

    reference.png    the anchor (uploaded, or rendered by ShapesWorld for the built-in model)
    story.json       the request's story (LoRAs resolved to the server's files)
    video.run/       per-clip segments and checkpoints (cliploom.runs): resume, extend, re-run
    video.mp4        the finished video, video.json its report
    thumbnail.png    the first frame; sprites/ one frame per clip, spritesheet.png of them all
    video.eval.*     ShapesWorld jobs: the evaluator's JSON, metrics plot and contact sheet (made
                     on the first request for them)

Cancel is checked after every denoising step (the delete takes effect within one step); a
crash leaves the run folder, from which the job resumes when a worker claims it again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import CliploomError
from ..runs import Run, run_folder_for
from ..story import story_from_dict
from .jobs import Job, JobStore

log = logging.getLogger(__name__)

STEP_EVENT_SECONDS = 0.5  # step events at most twice a second
BEAT_SECONDS = 0.2  # progress and heartbeat to the store, and its cancel flag read, at most this often


class Cancelled(Exception):
    """The job was deleted while it ran."""


def job_story(folder: Path):
    data = json.loads((folder / "story.json").read_text())
    return story_from_dict({**data, "reference": str(folder / "reference.png")}, base=folder)


def seed_from_parent(folder: Path, parent: Path, keep: int) -> None:
    """An extension or re-run starts from its parent's run folder: clips 0..keep-1 (hard links:
    segments and checkpoints are never modified once written) and its ``run.json``."""
    src = Run(parent / "video.run")
    dst = Run(folder / "video.run")
    if dst.folder.exists():
        shutil.rmtree(dst.folder)
    dst.clips_dir.mkdir(parents=True)
    for clip in src.saved()[:keep]:
        for name in [f"{clip.index:06d}.json", *clip.entry["files"]]:
            path = src.clips_dir / name
            if path.is_dir():
                shutil.copytree(path, dst.clips_dir / name, copy_function=_link)
            else:
                _link(path, dst.clips_dir / name)
    shutil.copyfile(src.folder / "run.json", dst.folder / "run.json")
    (folder / "sprites").mkdir(exist_ok=True)
    for i in range(keep):
        if (parent / "sprites" / f"{i:06d}.png").is_file():
            _link(parent / "sprites" / f"{i:06d}.png", folder / "sprites" / f"{i:06d}.png")
    for end in parent.glob("end_*.png"):  # uploaded end frames the kept clips were made with
        _link(end, folder / end.name)
    if keep and (parent / "thumbnail.png").is_file():
        _link(parent / "thumbnail.png", folder / "thumbnail.png")


def seed_from_upload(folder: Path, story, model, run: Run) -> None:
    """An uploaded video to extend becomes the run's clip 0, fitted to the story's size."""
    from ..video_io import cover_crop, read_video

    story = story.resolve(model.settings, model.size_multiple, model.scale_temporal)
    frames = read_video(folder / "upload.mp4")
    fitted = np.stack([np.asarray(cover_crop(Image.fromarray(f), story.width, story.height)) for f in frames])
    run.adopt(story, model, fitted, story.clips[0].prompt)
    save_previews(folder, 0, fitted)


def _link(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class Worker(threading.Thread):
    def __init__(self, store: JobStore, engines: dict, jobs_dir: Path, name: str = "worker-0",
                 idle_wait: float = 0.5, heartbeat_seconds: float = 5.0):
        super().__init__(name=name, daemon=True)
        self.store, self.engines, self.jobs_dir = store, engines, Path(jobs_dir)
        self.idle_wait, self.heartbeat_seconds = idle_wait, heartbeat_seconds
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.current: str | None = None
        self.cancelled_at: dict | None = None  # where the last cancelled job stopped (job, clip, step)
        self._cancel: str | None = None  # a delete of the running job, from this process's API

    def cancel(self, job_id: str) -> None:
        """Stop ``job_id`` at its next step if this worker runs it (the store's flag reaches
        workers in other processes within ``BEAT_SECONDS``)."""
        self._cancel = job_id

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def run(self) -> None:
        while not self.stopping.is_set():
            job = self.store.claim(self.name)
            if job is None:
                self.wake.wait(self.idle_wait)
                self.wake.clear()
                continue
            self.current = job.id
            try:
                self.run_job(job)
            except Exception:  # noqa: BLE001 - the worker outlives any job
                log.exception("job %s", job.id)
            finally:
                self.current = None

    # -- one job ----------------------------------------------------------------------------------
    def run_job(self, job: Job) -> None:
        folder = self.jobs_dir / job.id
        try:
            self._render(job, folder)
        except Cancelled:
            shutil.rmtree(folder, ignore_errors=True)
            self.store.remove(job.id)
        except CliploomError as e:
            self.store.finish(job.id, ("invalid_request", str(e)))
        except MemoryError:
            self.store.finish(job.id, ("out_of_memory", "the host ran out of memory; try fewer frames or a smaller size"))
        except Exception as e:  # noqa: BLE001 - a failed job must not stop the server
            name = type(e).__name__
            code = "out_of_memory" if "OutOfMemory" in name else "internal_error"
            first = (str(e).strip().splitlines() or [name])[0]
            log.exception("job %s failed", job.id)
            self.store.finish(job.id, (code, f"{name}: {first}"))

    def _render(self, job: Job, folder: Path) -> None:
        if self.store.cancelled(job.id):
            raise Cancelled()
        engine = self.engines[job.model]
        story = job_story(folder)
        out = folder / "video.mp4"
        run = Run(run_folder_for(out))
        if not (run.folder / "run.json").exists():
            if job.parent:
                seed_from_parent(folder, self.jobs_dir / job.parent, job.keep or 0)
            elif (folder / "upload.mp4").is_file():
                seed_from_upload(folder, story, engine.model, run)
        resume = (run.folder / "run.json").exists()
        per_clip = job.steps_per_clip
        last = {"beat": 0.0, "event": 0.0}
        progress = {"clips": job.clips_done, "steps": job.steps_done}  # clips checkpointed, steps denoised

        def stop(clip: int, step: int | None) -> None:
            self.cancelled_at = {"job": job.id, "clip": clip, "step": step, "at": time.time()}
            raise Cancelled()

        def on_step(i: int, k: int, steps: int) -> None:
            now = time.monotonic()
            if self._cancel == job.id:
                stop(i, k)
            progress["steps"] = max(progress["steps"], i * per_clip + k)
            if now - last["beat"] >= BEAT_SECONDS or k == steps:
                last["beat"] = now
                if not self.store.step(job.id, progress["clips"], progress["steps"]):
                    stop(i, k)
            if now - last["event"] >= STEP_EVENT_SECONDS or k == steps:
                last["event"] = now
                self.store.event(job.id, "step", {"clip": i, "step": k, "steps": steps,
                                                  "progress": self.store.get(job.id).progress})

        def on_clip(clip, entry: dict) -> None:
            save_previews(folder, clip.index, clip.frames.numpy())
            progress["clips"] = clip.index + 1  # clips are handed over in order, once checkpointed
            progress["steps"] = max(progress["steps"], progress["clips"] * per_clip)
            if not self.store.step(job.id, progress["clips"], progress["steps"]):
                stop(clip.index, None)
            self.store.event(job.id, "clip_done", {"clip": clip.index, "frames": entry["frames_body"],
                                                   "url": f"/v1/videos/{job.id}/clips/{clip.index}"})

        report = engine.render(story, out, progress=False, resume=resume, overwrite=not resume,
                               on_step=on_step, on_clip=on_clip)
        sprites = [folder / "sprites" / f"{i:06d}.png" for i in range(len(report["clips"]))]
        spritesheet([np.asarray(Image.open(p).convert("RGB")) for p in sprites if p.is_file()]).save(
            folder / "spritesheet.png")
        self.store.finish(job.id, data={"url": f"/v1/videos/{job.id}/content", "frames": report["totals"]["frames"]})


def save_previews(folder: Path, index: int, frames: np.ndarray) -> None:
    """Per clip, as it finishes: its middle frame for the spritesheet (and the video's first frame
    as the thumbnail), so the finished video never has to be decoded again."""
    sprites = folder / "sprites"
    sprites.mkdir(exist_ok=True)
    Image.fromarray(frames[len(frames) // 2]).save(sprites / f"{index:06d}.png")
    if index == 0:
        Image.fromarray(frames[0]).save(folder / "thumbnail.png")


_EVAL_LOCK = threading.Lock()


def evaluate_job(folder: Path) -> None:
    """The ShapesWorld evaluator's JSON, metrics plot and contact sheet for a finished job, made
    when first asked for (not on the job's own time)."""
    from ..evaluate import evaluate

    with _EVAL_LOCK:
        if not (folder / "video.eval.json").is_file():
            evaluate(folder / "video.mp4", out_dir=folder)


def spritesheet(frames: list[np.ndarray], columns: int = 10, cell: int = 160):
    h, w = frames[0].shape[:2]
    scale = min(1.0, cell / max(h, w)) if max(h, w) > cell else max(1, cell // max(h, w) // 2)
    cw, ch = max(1, int(w * scale)), max(1, int(h * scale))
    cols = min(columns, len(frames))
    rows = (len(frames) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cw, rows * ch), (16, 16, 16))
    for i, frame in enumerate(frames):
        tile = Image.fromarray(frame).resize((cw, ch), Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR)
        sheet.paste(tile, ((i % cols) * cw, (i // cols) * ch))
    return sheet
