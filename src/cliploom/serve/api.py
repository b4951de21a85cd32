"""HTTP routes: OpenAI's videos API (so the official ``openai`` client works unchanged) plus
cliploom's own streaming, extension and re-run routes. Parsing and answering only: stories are
built by ``forms``, jobs kept by ``jobs``, generation done by ``worker``.

    POST   /v1/videos                      create (multipart like OpenAI, or JSON)
    GET    /v1/videos                      list (cursor page: after, limit, order)
    GET    /v1/videos/{id}                 status, progress, clips_done / clips_total
    DELETE /v1/videos/{id}                 a queued job never starts; a running one stops within a step
    GET    /v1/videos/{id}/content         ?variant=video|thumbnail|spritesheet|eval_contact|eval_metrics
    GET    /v1/videos/{id}/clips/{n}       clip n as an MP4, as soon as it is finished
    GET    /v1/videos/{id}/events          server-sent events: queued, started, step, clip_done, completed, failed
    GET    /v1/videos/{id}/report          the run report (and the ShapesWorld evaluation)
    POST   /v1/videos/extensions           continue a finished video from its saved motion memory
    POST   /v1/videos/{id}/rerun           keep clips 0..N-1, remake the rest with new prompts or seeds
    GET    /v1/models, /v1/loras           what this server offers
    GET    /v1/shapesworld/reference       a ShapesWorld first frame for a prompt (the page's reference)
    GET    /healthz                        liveness, queue length (no token needed)
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import CliploomError
from ..sampling import schedule
from . import forms
from .jobs import Job, JobStore

PAGE = Path(__file__).resolve().parent / "page"


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind
        self.headers = headers or {}


class TooLarge(Exception):
    pass


@dataclass
class ModelEntry:
    name: str
    engine: object  # cliploom.Engine; None when the model lives in Ray replicas
    known_settings: object = None  # the replicas' ModelSettings then

    @property
    def settings(self):
        return self.engine.model.settings if self.engine is not None else self.known_settings


@dataclass
class ServerState:
    store: JobStore
    data_dir: Path
    models: dict[str, ModelEntry]
    lora_dir: Path | None = None
    token: str | None = None
    limits: forms.Limits = field(default_factory=forms.Limits)
    workers: list = field(default_factory=list)
    bell: object = None
    replicas: object = None  # serve.replicas.RayReplicas with --ray

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    def wake(self) -> None:
        for worker in self.workers:
            worker.wake.set()


# -- answers ----------------------------------------------------------------------------------------


def error_body(message: str, code: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def video_object(job: Job, position: int | None = None) -> dict:
    out = {
        "id": job.id,
        "object": "video",
        "created_at": job.created_at,
        "status": job.status,
        "progress": job.progress,
        "model": job.model,
        "prompt": job.prompt,
        "seconds": job.seconds,
        "size": job.size,
        "error": {"code": job.error_code, "message": job.error_message} if job.status == "failed" else None,
        "completed_at": job.completed_at,
        "expires_at": None,
        "remixed_from_video_id": job.parent,
        "clips_done": job.clips_done,
        "clips_total": job.clips_total,
    }
    if position is not None:
        out["queue_position"] = position
    return out


# -- the app ----------------------------------------------------------------------------------------


class Bell:
    """Wakes the event streams of a job as soon as the worker (in this process) records an event;
    streams also poll the store, so events written by other processes arrive too."""

    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None
        self.waiting: dict[str, set[asyncio.Event]] = {}

    def ring(self, job_id: str) -> None:  # any thread
        if self.loop is not None and job_id in self.waiting:
            self.loop.call_soon_threadsafe(self._set, job_id)

    def _set(self, job_id: str) -> None:
        for event in self.waiting.get(job_id, ()):
            event.set()

    def listen(self, job_id: str) -> asyncio.Event:
        """Register before reading the store, so an event recorded in between still rings."""
        self.loop = self.loop or asyncio.get_running_loop()
        event = asyncio.Event()
        self.waiting.setdefault(job_id, set()).add(event)
        return event

    def forget(self, job_id: str, event: asyncio.Event) -> None:
        self.waiting.get(job_id, set()).discard(event)
        if not self.waiting.get(job_id, True):
            del self.waiting[job_id]


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="cliploom", version=_version(), docs_url="/docs", redoc_url=None)
    app.state.cliploom = state
    state.bell = Bell()
    state.store.listeners.append(state.bell.ring)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(error_body(e.message, e.code, e.param, e.kind), status_code=e.status, headers=e.headers)

    @app.exception_handler(CliploomError)
    async def _bad_input(request: Request, e: CliploomError):
        return JSONResponse(error_body(str(e), "invalid_value", getattr(e, "param", None)), status_code=400)

    @app.exception_handler(TooLarge)
    async def _too_large(request: Request, e: TooLarge):
        return _413(state)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", [])[1:]) or None
        return JSONResponse(error_body(f"{param or 'request'}: {first.get('msg', 'invalid')}", "invalid_value", param),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return JSONResponse(error_body(str(e.detail), code), status_code=e.status_code)

    app.include_router(_routes(state), prefix="/v1", dependencies=[Depends(_auth(state))])

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "queued": state.store.queued_count(),
                "workers": [{"name": w.name, "alive": w.is_alive() or w.current is not None, "job": w.current,
                             "last_cancel": w.cancelled_at,
                             **({"state": w.state, "error": w.error, "pid": w.pid, "node": w.node, "restarts": w.restarts}
                                if state.replicas is not None else {})} for w in state.workers]}

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(PAGE / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/page", StaticFiles(directory=PAGE), name="page")
    return _BodyLimit(app, state.limits.max_body_bytes)


def _version() -> str:
    from .. import __version__

    return __version__


def _413(state: ServerState) -> JSONResponse:
    mb = state.limits.max_body_bytes / 2**20
    return JSONResponse(error_body(f"request body larger than {mb:g} MB", "request_too_large"), status_code=413)


class _BodyLimit:
    """Refuse bodies over the limit: by Content-Length before reading, else while reading."""

    def __init__(self, app: FastAPI, limit: int):
        self.app, self.limit = app, limit
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _413(self.state.cliploom)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise TooLarge()
            return message

        await self.app(scope, limited, send)


def _auth(state: ServerState):
    async def check(request: Request) -> None:
        if not state.token:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), state.token.encode()):
            raise ApiError(401, "missing or wrong API token", "invalid_api_key", kind="authentication_error",
                           headers={"WWW-Authenticate": "Bearer"})

    return check


# -- routes -----------------------------------------------------------------------------------------


def _routes(state: ServerState) -> APIRouter:
    r = APIRouter()
    store = state.store

    def job_or_404(video_id: str) -> Job:
        job = store.get(video_id)
        if job is None:
            raise ApiError(404, f"no video {video_id!r}", "video_not_found", "video_id")
        return job

    @r.get("/models")
    def models():
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": 0, "owned_by": "cliploom",
             "family": m.settings.family, "width": m.settings.width, "height": m.settings.height,
             "fps": m.settings.fps, "frames": m.settings.frames, "steps": m.settings.steps,
             "builtin": m.settings.family == "shapesworld"} for m in state.models.values()]}

    @r.get("/loras")
    def loras():
        names = sorted(p.stem for p in state.lora_dir.glob("*.safetensors")) if state.lora_dir else []
        return {"object": "list", "data": [{"id": n, "object": "lora"} for n in names if forms.NAME.match(n)]}

    @r.post("/videos")
    async def create(request: Request):
        fields, files = await _fields(request, state)
        return await run_in_threadpool(_create, state, fields, files)

    @r.get("/videos")
    def list_videos(after: str | None = None, limit: int = 20, order: str = "desc"):
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order must be asc or desc, got {order!r}", "invalid_value", "order")
        limit = max(1, min(100, limit))
        jobs, more = store.list(after, limit, order)
        data = [video_object(j) for j in jobs]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": more}

    @r.get("/videos/{video_id}")
    def retrieve(video_id: str):
        job = job_or_404(video_id)
        return video_object(job, store.position(video_id) if job.status == "queued" else None)

    @r.delete("/videos/{video_id}")
    def delete(video_id: str):
        status = store.request_delete(video_id)
        if status is None:
            raise ApiError(404, f"no video {video_id!r}", "video_not_found", "video_id")
        if status == "in_progress":  # the worker stops at its next step and removes the files
            for worker in state.workers:
                worker.cancel(video_id)
        else:  # gone from the store; its files go now
            shutil.rmtree(state.jobs_dir / video_id, ignore_errors=True)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    @r.get("/videos/{video_id}/content")
    def content(video_id: str, variant: str = "video"):
        job = job_or_404(video_id)
        names = {"video": ("video.mp4", "video/mp4"), "thumbnail": ("thumbnail.png", "image/png"),
                 "spritesheet": ("spritesheet.png", "image/png"), "eval_contact": ("video.eval_contact.png", "image/png"),
                 "eval_metrics": ("video.eval_metrics.png", "image/png")}
        if variant not in names:
            raise ApiError(400, f"unknown variant {variant!r}", "invalid_value", "variant")
        if job.status != "completed":
            raise ApiError(409, f"video {video_id} is {job.status}, not completed", "video_not_ready")
        name, media = names[variant]
        path = state.jobs_dir / video_id / name
        if variant.startswith("eval_") and not path.is_file() and _is_shapesworld(state, job):
            _evaluate(state.jobs_dir / video_id)
        if not path.is_file():
            raise ApiError(404, f"video {video_id} has no {variant}", "variant_not_found", "variant")
        return FileResponse(path, media_type=media, filename=f"{video_id}{path.suffix}" if variant == "video" else None)

    @r.get("/videos/{video_id}/clips/{index}")
    def clip(video_id: str, index: int):
        job = job_or_404(video_id)
        if not 0 <= index < job.clips_total:
            raise ApiError(404, f"video {video_id} has clips 0..{job.clips_total - 1}", "clip_not_found", "index")
        path = state.jobs_dir / video_id / "video.run" / "clips" / f"{index:06d}.mp4"
        if not (path.with_suffix(".json")).is_file() or not path.is_file():
            raise ApiError(409, f"clip {index} of {video_id} is not finished yet", "clip_not_ready")
        return FileResponse(path, media_type="video/mp4")

    @r.get("/videos/{video_id}/report")
    def report(video_id: str):
        job = job_or_404(video_id)
        folder = state.jobs_dir / video_id
        out = {"video": video_object(job)}
        if job.status == "completed" and _is_shapesworld(state, job):
            _evaluate(folder)
        for key, name in (("report", "video.json"), ("evaluation", "video.eval.json")):
            path = folder / name if (folder / name).is_file() else folder / "video.run" / "progress.json"
            if key == "evaluation" and not (folder / name).is_file():
                continue
            try:
                out[key] = json.loads(path.read_text())
            except (OSError, ValueError):
                pass
        return out

    @r.get("/videos/{video_id}/events")
    async def events(video_id: str, request: Request):
        await run_in_threadpool(job_or_404, video_id)
        last = request.headers.get("last-event-id", "")
        return StreamingResponse(_event_stream(state, video_id, int(last) if last.isdigit() else 0, request),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @r.post("/videos/extensions")
    async def extend(request: Request):
        fields, files = await _fields(request, state)
        return await run_in_threadpool(_extend, state, fields, files)

    @r.post("/videos/{video_id}/rerun")
    async def rerun(video_id: str, request: Request):
        fields, _ = await _fields(request, state)
        return await run_in_threadpool(_rerun, state, video_id, fields)

    @r.get("/shapesworld/reference")
    def shapesworld_reference(prompt: str, size: int = 32):
        import io

        if not 8 <= size <= 1024:
            raise ApiError(400, f"size {size} is outside 8..1024", "invalid_value", "size")
        from ..shapesworld import render_reference

        try:
            image = render_reference(prompt[:500], size=size)
        except (ValueError, KeyError) as e:
            raise ApiError(400, f"not a ShapesWorld prompt: {e}", "invalid_value", "prompt") from None
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png")

    return r


async def _fields(request: Request, state: ServerState) -> tuple[dict, dict]:
    """Form fields and uploaded files, from multipart / urlencoded forms or a JSON body. OpenAI's
    reference objects arrive in forms as ``video[id]``; JSON bodies nest them (``{"video": {"id": ...}}``)."""
    kind = request.headers.get("content-type", "")
    fields: dict = {}
    files: dict = {}
    if kind.startswith("application/json"):
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            raise ApiError(400, "the JSON body is malformed", "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the JSON body must be an object", "invalid_json")
        for key, value in body.items():
            if isinstance(value, dict) and key in ("video", "input_reference"):
                for sub, v in value.items():
                    fields[f"{key}[{sub}]"] = v
            elif key in ("prompts", "story") and not isinstance(value, str):
                fields[key] = json.dumps(value)
            else:
                fields[key] = value
        return fields, files
    if kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form(max_files=16, max_fields=64, max_part_size=2**20)
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                files[key] = await value.read()
            else:
                fields[key] = value
        return fields, files
    if await request.body():
        raise ApiError(415, f"unsupported content type {kind!r}", "unsupported_media_type")
    return fields, files


def _is_shapesworld(state: ServerState, job: Job) -> bool:
    entry = state.models.get(job.model)
    return entry is not None and entry.settings.family == "shapesworld"


def _evaluate(folder: Path) -> None:
    from .worker import evaluate_job

    try:
        evaluate_job(folder)
    except (ValueError, CliploomError):  # nothing to measure (no subject, an uploaded first clip...)
        pass


def _model(state: ServerState, name) -> ModelEntry:
    if not name or name not in state.models:
        if not name or name.startswith("sora"):  # OpenAI's default names mean "this server's model"
            return next(iter(state.models.values()))
        raise ApiError(400, f"unknown model {name!r}; this server has {', '.join(state.models)}", "model_not_found", "model")
    return state.models[name]


def _queue_full(state: ServerState) -> ApiError:
    return ApiError(429, f"the queue is full ({state.limits.max_queue} videos waiting)", "queue_full",
                    kind="rate_limit_error", headers={"Retry-After": "30"})


def _steps(story) -> int:
    return len(schedule(story.steps, story.shift, story.timesteps)) - 1


def _queue(state: ServerState, folder: Path, job: Job) -> dict:
    """Publish a job folder prepared under a temporary name and queue the job (429 when full)."""
    final = state.jobs_dir / job.id
    folder.rename(final)
    if not state.store.create(job, max_queued=state.limits.max_queue):
        shutil.rmtree(final, ignore_errors=True)
        raise _queue_full(state)
    state.wake()
    return video_object(state.store.get(job.id), state.store.position(job.id))


def _new_folder(state: ServerState, job_id: str) -> Path:
    state.jobs_dir.mkdir(parents=True, exist_ok=True)
    folder = state.jobs_dir / f".{job_id}.partial"
    folder.mkdir()
    return folder


def _create(state: ServerState, fields: dict, files: dict) -> dict:
    if state.store.queued_count() >= state.limits.max_queue:
        raise _queue_full(state)
    entry = _model(state, fields.get("model"))
    job_id = JobStore.new_id()
    folder = _new_folder(state, job_id)
    try:
        reference = folder / "reference.png"
        data, story = forms.build_story(fields, entry.settings, reference=reference, lora_dir=state.lora_dir,
                                        limits=state.limits)
        if "input_reference" in files:
            forms.save_reference(files["input_reference"], reference, state.limits)
        elif entry.settings.family == "shapesworld":
            forms.shapesworld_reference(story.clips[0].prompt, reference, story.width)
        else:
            raise forms.bad("input_reference is required for this model", "upload the anchor image", "input_reference")
        if any(key.startswith("end_frame[") for key in files):
            data, story = _end_frames(state, entry, folder, data, files)
        (folder / "story.json").write_text(json.dumps(data, indent=2))
        job = _job(job_id, entry.name, fields.get("prompt") or story.clips[0].prompt, story)
        return _queue(state, folder, job)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _end_frames(state: ServerState, entry, folder: Path, data: dict, files: dict):
    """Uploaded end frames, ``end_frame[N]`` (N: a clip, from 0): saved in the job folder as the
    clips' ``end_frame`` (the server names the files; a request never names a path)."""
    import re

    from ..story import check_keyframe_images, story_from_dict

    clips = []
    for clip in data["clips"]:  # one entry per clip, so N means what the report will call clip N
        item = {"prompt": clip} if isinstance(clip, str) else dict(clip)
        clips.extend({k: v for k, v in item.items() if k != "repeat"} for _ in range(int(item.get("repeat", 1))))
    for key, upload in files.items():
        m = re.fullmatch(r"end_frame\[(\d+)\]", key)
        if key == "input_reference":
            continue
        if m is None or int(m.group(1)) >= len(clips):
            raise forms.bad(f"{key}: the video has clips 0..{len(clips) - 1}", "send end_frame[N] with N a clip number", key)
        n = int(m.group(1))
        forms.save_reference(upload, folder / f"end_{n:06d}.png", state.limits)
        clips[n]["end_frame"] = f"end_{n:06d}.png"
    data = {**data, "clips": clips}
    try:
        story = story_from_dict({**data, "reference": str(folder / "reference.png")}, base=folder).resolve(entry.settings)
        check_keyframe_images(story)
    except CliploomError as e:
        raise forms.bad(e.problem.split(": ", 1)[-1], e.fix or "", "end_frame") from None
    return data, story


def _job(job_id: str, model: str, prompt: str, story, parent: str | None = None, keep: int = 0) -> Job:
    steps = _steps(story)
    return Job(id=job_id, status="queued", created_at=int(time.time()), model=model, prompt=prompt,
               seconds=f"{story.total_frames() / story.fps:g}", size=f"{story.width}x{story.height}",
               clips_total=len(story.clips), steps_per_clip=steps, clips_done=keep, steps_done=keep * steps,
               parent=parent, keep=keep or None)


def _continue(state: ServerState, parent: Job, keep: int, fields: dict) -> dict:
    """A new video that keeps ``keep`` clips of ``parent`` and generates the clips ``fields`` ask for."""
    if parent.status != "completed":
        raise ApiError(409, f"video {parent.id} is {parent.status}; only a completed video continues",
                       "video_not_ready", "video")
    if state.store.queued_count() >= state.limits.max_queue:
        raise _queue_full(state)
    entry = _model(state, parent.model)
    source = state.jobs_dir / parent.id
    base = json.loads((source / "story.json").read_text())
    kept = _kept_clips(base, keep, source)
    job_id = JobStore.new_id()
    folder = _new_folder(state, job_id)
    try:
        os.link(source / "reference.png", folder / "reference.png")
        data, story = forms.build_story(fields, entry.settings, reference=folder / "reference.png",
                                        lora_dir=state.lora_dir, limits=state.limits, base={**base, "clips": kept})
        (folder / "story.json").write_text(json.dumps(data, indent=2))
        job = _job(job_id, entry.name, fields.get("prompt") or story.clips[keep].prompt, story, parent.id, keep)
        return _queue(state, folder, job)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _kept_clips(base: dict, keep: int, source: Path) -> list[dict]:
    """The parent's first ``keep`` clips, one entry each (repeats spelled out, indices unchanged,
    so every kept clip keeps its seed)."""
    from ..story import story_from_dict

    story = story_from_dict({**base, "reference": str(source / "reference.png")}, base=source)
    def keys(c):  # uploaded end frames, by the names the server gave them (linked into the new job's folder)
        return {"keyframes": [{"frame": k.frame, "image": Path(k.image).name} for k in c.keyframes]} if c.keyframes else {}

    return [{"prompt": c.prompt, **({"seed": c.seed} if c.seed is not None else {}),
             **({"loras": c.lora_weights} if c.lora_weights else {}), **keys(c)} for c in story.clips[:keep]]


def _extend(state: ServerState, fields: dict, files: dict) -> dict:
    if "video" in files:
        return _extend_upload(state, fields, files)
    video_id = fields.get("video[id]") or fields.get("video_id")
    if not video_id:
        raise ApiError(400, "no video to extend", "missing_field", "video")
    parent = state.store.get(str(video_id))
    if parent is None:
        raise ApiError(404, f"no video {video_id!r}", "video_not_found", "video")
    return _continue(state, parent, parent.clips_total, fields)


UPLOADED = "(the uploaded video)"
PIXEL_DEFAULT = "svi2"


def _extend_upload(state: ServerState, fields: dict, files: dict) -> dict:
    """Extend an uploaded video file: there is no saved motion memory, so it continues from its
    last frames, pixel-motion style (mode svi2 unless the story names another mode), or in mode
    pro from its last frames encoded (``memory_from: frames``)."""
    import av
    import numpy as np
    from PIL import Image

    if state.store.queued_count() >= state.limits.max_queue:
        raise _queue_full(state)
    entry = _model(state, fields.get("model"))
    text = forms.parse_story_text(fields.get("story"))
    if text.get("mode") == "pro" and text.get("memory_from", entry.settings.memory_from) != "frames":
        raise ApiError(400, "an uploaded video has no saved motion latents: mode pro continues it only with "
                       "memory_from: frames (its last frames encoded)", "invalid_value", "story")
    fields = {**fields, "story": json.dumps({"mode": PIXEL_DEFAULT, **text})}
    job_id = JobStore.new_id()
    folder = _new_folder(state, job_id)
    try:
        upload = folder / "upload.mp4"
        upload.write_bytes(files["video"])
        try:
            with av.open(str(upload)) as container:
                stream = container.streams.video[0]
                if stream.codec_context.width * stream.codec_context.height > state.limits.max_image_pixels:
                    raise ApiError(400, "the video's frames are too large", "invalid_value", "video")
                first = next(container.decode(video=0)).to_ndarray(format="rgb24")
        except (av.error.FFmpegError, IndexError, StopIteration, OSError) as e:
            raise ApiError(400, f"video is not a readable video file: {e}", "invalid_value", "video") from None
        reference = folder / "reference.png"
        if "input_reference" in files:
            forms.save_reference(files["input_reference"], reference, state.limits)
        else:
            Image.fromarray(np.asarray(first)).save(reference)
        data, story = forms.build_story(fields, entry.settings, reference=reference, lora_dir=state.lora_dir,
                                        limits=state.limits, prefix=[UPLOADED])
        (folder / "story.json").write_text(json.dumps(data, indent=2))
        job = _job(job_id, entry.name, fields.get("prompt") or story.clips[1].prompt, story, keep=1)
        return _queue(state, folder, job)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _rerun(state: ServerState, video_id: str, fields: dict) -> dict:
    parent = state.store.get(video_id)
    if parent is None:
        raise ApiError(404, f"no video {video_id!r}", "video_not_found", "video_id")
    start = forms._int(fields.get("from_clip"), "from_clip")
    if start is None or not 0 <= start <= parent.clips_total:
        raise ApiError(400, f"from_clip must be 0..{parent.clips_total}", "invalid_value", "from_clip")
    return _continue(state, parent, start, fields)


async def _event_stream(state: ServerState, video_id: str, last: int, request: Request):
    quiet_since = time.monotonic()
    bell = state.bell
    while True:
        if await request.is_disconnected():
            return
        ring = bell.listen(video_id)
        try:
            events = await run_in_threadpool(state.store.events, video_id, last)
            for seq, kind, data in events:
                last = seq
                quiet_since = time.monotonic()
                yield f"id: {seq}\nevent: {kind}\ndata: {json.dumps({'type': kind, 'video_id': video_id, **data})}\n\n"
                if kind in ("completed", "failed"):
                    return
            if not events:
                job = await run_in_threadpool(state.store.get, video_id)
                if job is None:
                    yield f"event: deleted\ndata: {json.dumps({'type': 'deleted', 'video_id': video_id})}\n\n"
                    return
                if time.monotonic() - quiet_since > 15:
                    quiet_since = time.monotonic()
                    yield ": keep-alive\n\n"
                try:  # woken by this process's worker at once; events of other processes within 0.5 s
                    await asyncio.wait_for(ring.wait(), 0.5)
                except asyncio.TimeoutError:
                    pass
        finally:
            bell.forget(video_id, ring)
