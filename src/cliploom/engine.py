"""The Python API: load a model once, generate many stories.

    import cliploom
    engine = cliploom.Engine.load()                      # the built-in model, or a folder
    story = cliploom.load_story("story.yaml")
    for clip in engine.generate(story):                  # clips arrive as they finish
        print(clip.index, clip.frames.shape)
    report = engine.render(story, "out/video.mp4")       # streams to disk, returns the report
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from . import __version__
from .errors import CliploomError
from .loom import Clip, Start
from .models.components import Components
from .models.loading import load_model
from .models.lora import LoraStack
from .models.memory import apply_memory_options, check_story_fits
from .story import LoraSpec, Story
from .routes import CAUSAL_ROUTES, ROUTES, weave_for
from .runs import Run, run_folder_for
from .video_io import check_output, is_dir_target, write_json_atomic


log = logging.getLogger(__name__)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def apply_speed_options(model, story: Story) -> None:
    """The story's attention backend, compilation and fp8 matmuls (models.acceleration)."""
    from .models import acceleration as acc

    name = acc.resolve_attention(story.attention, model.device)
    if getattr(model, "_cliploom_attention", "sdpa") != name:
        acc.set_attention(model, name)
    model._cliploom_attention = name
    if story.fp8_matmul:
        acc.quantize_fp8_matmul(model)
    if story.compile:
        acc.compile_blocks(model)


def drift_warnings(story: Story, settings) -> list[str]:
    """Settings that users and the SVI authors report to make long videos drift."""
    out = []
    seeds = [c.seed for c in story.clips]
    if len(seeds) > 1 and seeds[0] is not None and len(set(seeds)) == 1:
        out.append(f"every clip has seed {seeds[0]}: the same noise each clip makes long videos drift and repeat; "
                   "leave clip seeds out (each clip then draws its own from the story seed)")
    if story.frames != settings.frames:
        out.append(f"clips of {story.frames} frames, but this model was trained on {settings.frames}-frame clips: "
                   "other lengths drift in colour and motion (SVI recommends the trained length)")
    if len(story.clips) > 1 and story.color_match in (None, "none") and settings.color_match not in (None, "none"):
        out.append(f"colour matching is off, but this model turns it on (color_match: {settings.color_match}): "
                   "without it long videos drift in colour (the built-in model, 20 clips: 57 % of clips pass "
                   "against 98 %, docs/benchmarks.md); leave color_match out of the story")
    return out


def trained_route(spec) -> str | None:
    """The route a LoRA file was trained for (``cliploom_route`` in its metadata), or None."""
    from .models.formats import read_header

    return read_header(spec.path, "LoRA").metadata.get("cliploom_route")


def check_lora_routes(loras, route: str, trained: list[str | None] | None = None) -> None:
    """Refuse a LoRA trained for another route's loop (``cliploom_route`` in its metadata, written
    by ``train-svi`` and ``cliploom convert``): a causal LoRA under the SVI loop, or an SVI LoRA
    under the causal one, makes noise rather than video. Untagged LoRAs (style LoRAs, files from
    other tools) go anywhere."""
    for spec, trained in zip(loras, trained if trained is not None else [trained_route(s) for s in loras]):
        if trained and trained != route:
            raise CliploomError(f"LoRA {spec.path} was trained for route {trained}; this story runs route {route}",
                                f"set route: {trained} in the story (or --route {trained}), or drop that LoRA")


class Engine:
    """A loaded model plus the LoRA stack currently applied to it."""

    def __init__(self, model: Components):
        self.model = model
        self.loras = LoraStack(model)
        self.helios_loras: LoraStack | None = None  # route helios: the stack on its transformer (models.helios)

    @classmethod
    def load(
        cls,
        model: str | Path | None = None,
        *,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        family: str | None = None,
        offload: str | None = None,
        weights: str | None = None,
    ) -> "Engine":
        """Load a model folder (or, with ``family``, original-format files) once for many stories.

        With ``offload`` (the stories' offload mode) the weights stay in host memory until offloading
        starts, so a model larger than the GPU loads."""
        return cls(load_model(model, device=device, dtype=dtype, family=family, offload=offload, weights=weights))

    def generate(
        self,
        story: Story,
        *,
        progress: bool = True,
        overlap_decode: bool | None = None,
        on_clip_start: Callable[[int], None] | None = None,
        on_step: Callable[[int, int, int], None] | None = None,
        start: Start | None = None,
        on_block: Callable[[int, torch.Tensor], None] | None = None,
    ) -> Iterator[Clip]:
        """Yield the story's clips in order, each as soon as it is decoded (from ``start.index``
        on when ``start`` is given: see :class:`cliploom.loom.Start`). ``on_block(clip, frames)``
        streams each block's frames before its clip is done (the causal routes only)."""
        m = self.model
        if on_block is not None and story.route not in CAUSAL_ROUTES:
            raise CliploomError(f"route {story.route} makes whole clips; only the causal routes stream blocks",
                                "drop the block callback, or use route: causal (or self-forcing)")
        if m.settings.native_routes == ("helios",) and story.route != "helios":
            raise CliploomError(f"the model at {m.path} is a Helios DiT: it takes the past as history, so it runs "
                                f"route helios only, not {story.route}", "set route: helios (or --route helios)")
        resolved = story.resolve(m.settings, m.size_multiple, m.scale_temporal)
        check_story_fits(m, resolved)  # before anything is applied
        if any(c.keyframes for c in resolved.clips):
            from .story import check_keyframe_images

            check_keyframe_images(resolved)
        if getattr(m, "_cliploom_parallel", None) is not None:
            from .parallel import check_tokens

            check_tokens(m, resolved)
        fp8 = getattr(m.transformer, "_cliploom_weights", None) == "fp8"  # adapters beside fp8 layers, never fused
        loras = self.default_loras(story) + list(story.loras)
        if story.fp8_matmul:  # torchao quantises the high-precision weights, LoRAs fused in first
            if fp8 or getattr(m.transformer, "_cliploom_weights", None) == "gguf":
                raise CliploomError("fp8_matmul quantises bf16 weights itself; this engine stores them as "
                                    f"{m.transformer._cliploom_weights}", "load with weights: bf16 for fp8_matmul")
            if loras and not story.fuse_loras:
                raise CliploomError("fp8_matmul needs the LoRAs fused into the weights it quantises",
                                    "drop fuse_loras: false (--no-fuse), or fp8_matmul")
        # first_clip i2v: clip 0 is the model's own image-to-video, so the continuation LoRA (the SVI
        # LoRA, on route df the df LoRA: named after the route, as the model's own, or trained for it)
        # is off there -- a per-clip weight, which needs the stack unfused when clip 0 is generated
        # (route helios: clip 0 runs on the plain DiT, its LoRAs are on the Helios transformer)
        trained = [trained_route(lo) for lo in loras]  # each file's header read once
        continuation = [lo.name for lo, t in zip(loras, trained) if lo.name == story.route or t == story.route]
        first_i2v = (resolved.first_clip == "i2v" and story.route != "helios" and bool(continuation)
                     and (start is None or start.index == 0))
        if first_i2v and story.fp8_matmul:
            raise CliploomError("first_clip: i2v runs clip 0 without the SVI (or df) LoRA, a per-clip weight that fp8_matmul's "
                                "fused weights cannot change", "use first_clip: pro with fp8_matmul")
        check_lora_routes(loras, story.route, trained)
        from .models import helios

        if story.route == "helios":  # its LoRAs go on its own transformer, which shares the DiT's weights
            self.loras.apply([])  # the DiT plain (a fused stack is refused here, as for any new stack)
            self.helios_loras = helios.apply_loras(m, loras)
        else:
            helios.drop_loras(m)
            self.loras.apply(loras, fuse=story.fuse_loras and not fp8 and not first_i2v)
        if story.offload in ("group", "sequential"):
            self.loras.unmerge()  # a stack merged by an earlier story: offloaded copies must not hold it
        apply_memory_options(self.model, story.offload, story.vae_tiling)  # after the LoRAs: hooks wrap final weights
        apply_speed_options(m, story)
        for warning in drift_warnings(resolved, m.settings):  # once the story is known to run
            log.warning("%s", warning)

        def clip_weights(i: int) -> dict[str, float] | None:
            weights = story.clips[i].lora_weights
            if first_i2v and i == 0:  # off unless clip 0 names its own weight for it
                weights = {**{name: 0.0 for name in continuation}, **(weights or {})}
            return weights

        # From the clip on which the weights stop changing, an unfused stack runs merged into the
        # weights (LoraStack.merge: float32 only), at the base model's speed; merged once, there.
        stack = {lo.name: float(lo.weight) for lo in loras}
        final = [{**stack, **(clip_weights(i) or {})} for i in range(len(story.clips))]
        settled = next((k + 1 for k in range(len(final) - 1, -1, -1) if final[k] != final[-1]), 0)
        merge_at = max(settled, start.index if start is not None else 0)

        def clip_start(i: int) -> None:
            # every clip, per-clip weights or not: an earlier story (one cancelled in its i2v clip 0, say)
            # may have left the same stack at other weights; unmerges a merged stack when they change
            self.loras.set_clip_weights(clip_weights(i))
            if i == merge_at:
                self.loras.merge()
            if on_clip_start is not None:
                on_clip_start(i)

        extra = {"on_block": on_block} if on_block is not None else {}
        yield from weave_for(story.route)(self.model, story, progress=progress, overlap_decode=overlap_decode,
                                          on_clip_start=clip_start, on_step=on_step, start=start, **extra)

    def default_loras(self, story: Story) -> list[LoraSpec]:
        """The model's own weights for the story's route: its SVI LoRA (``svi_lora`` in its
        cliploom.json; ``keyframe_lora`` instead when a clip has keyframes and the model ships one),
        or the route's LoRA (``route_loras``) -- unless the story turns them off (``svi_lora: false``)
        or brings its own: a story LoRA trained for the route (``cliploom_route`` in its metadata, as
        ``train-svi`` writes) takes the model's place instead of being stacked on it. A route other
        than ``svi`` on a model without its weights, and no LoRA in the story, is refused."""
        settings = self.model.settings
        if story.route != "svi" and story.route in settings.native_routes:
            return []  # the model's own DiT is the route's (a SkyReels-V2 DF folder for df, a causal DiT)
        if any(trained_route(spec) == story.route for spec in story.loras):
            return []  # the story's own weights for the route
        if story.route != "svi":
            name = (settings.route_loras or {}).get(story.route)
            if name and story.svi_lora:
                return [LoraSpec(self.model.path / name, 1.0, "both", story.route)]
            if not story.loras:
                why = ("svi_lora: false turns off its own" if name else
                       "has no {0} weights (route_loras in its cliploom.json)".format(story.route))
                raise CliploomError(
                    f"route {story.route}: the model at {self.model.path} {why} and the story gives no LoRA",
                    f"train them (cliploom train-svi with route: {story.route}) and pass the LoRA in `loras:`, "
                    "or use route: svi")
            return []
        name = settings.svi_lora_for(story)
        if not name:
            return []
        return [LoraSpec(self.model.path / name, 1.0, "both", "svi")]

    def render(
        self,
        story: Story,
        out: str | Path,
        *,
        progress: bool = True,
        overwrite: bool = False,
        resume: bool = False,
        from_clip: int | None = None,
        overlap_decode: bool | None = None,
        on_clip_start: Callable[[int], None] | None = None,
        on_step: Callable[[int, int, int], None] | None = None,
        on_clip: Callable[[Clip, dict], None] | None = None,
    ) -> dict:
        """Generate ``story`` into ``out`` (``x.mp4`` or ``DIR/``) and write the JSON report.

        Each clip is checkpointed in the run folder beside the output (``x.run/``, see
        :mod:`cliploom.runs`) as soon as it is decoded; the output appears under its final name
        only when the video is complete. ``resume`` continues an interrupted run after its last
        finished clip; ``from_clip=N`` keeps clips 0..N-1 of a finished run (byte for byte) and
        generates the rest from the story. ``on_clip(clip, entry)`` runs after each checkpoint.
        """
        resolved = story.resolve(self.model.settings, self.model.size_multiple, self.model.scale_temporal)
        out = Path(out)
        again = resume or from_clip is not None
        check_output(out, overwrite or again)
        run = Run(run_folder_for(out), png=is_dir_target(out))
        start = run.prepare(resolved, self.model, resume=resume, from_clip=from_clip, overwrite=overwrite,
                            name=str(story.source or out))
        report = self._report_head(resolved, out)
        report["run"] = str(run.folder)
        report["resumed_at_clip"] = start.index if again else None
        report["clips"] = [_entry_of(saved.entry) for saved in run.saved()]
        totals = _Totals(resolved.fps, report["clips"])
        progress_path = run.folder / "progress.json"
        started = time.perf_counter()
        for clip in self.generate(story, progress=progress, overlap_decode=overlap_decode,
                                  on_clip_start=on_clip_start, on_step=on_step, start=start):
            saved = run.save(clip, resolved, _clip_entry(clip))
            entry = _entry_of(saved.entry)
            report["clips"].append(entry)
            totals.add(entry)
            # The run so far, inside the run folder: constant size however long the video gets.
            write_json_atomic(progress_path, {"output": str(out), "clips_done": len(report["clips"]),
                                              "last_clip": entry, "totals": totals.value(time.perf_counter() - started)})
            if on_clip is not None:
                on_clip(clip, saved.entry)
        stack = self.helios_loras if story.route == "helios" and self.helios_loras is not None else self.loras
        report["story"]["loras"] = stack.summary()  # applied by generate, after the head was written
        report["attention"] = getattr(self.model, "_cliploom_attention", "sdpa")
        report["compiled"] = bool(getattr(self.model, "_cliploom_compiled", False))
        n = len(report["clips"])
        tail = run.saved()[-1].entry["frames_tail"] if n else 0
        report["clips"][-1]["frames_kept"] += tail  # the last clip keeps its tail
        totals.frames += tail
        report["totals"] = totals.value(time.perf_counter() - started)
        report["report_path"] = str(run.assemble(out, n, resolved.fps, report))
        progress_path.unlink(missing_ok=True)
        return report

    def _report_head(self, s: Story, out) -> dict:
        m = self.model
        motion = {"motion_latents": s.motion_latents} if s.latent_motion else {
            "motion_frames": s.motion_frames, "ref_pad": s.ref_pad}
        return {
            "cliploom": __version__,
            "output": str(out),
            "model": str(m.path),
            "family": m.settings.family,
            "device": str(m.device),
            "dtype": str(m.dtype).replace("torch.", ""),
            "weights": getattr(m.transformer, "_cliploom_weights", None) or DTYPE_NAMES.get(m.dtype, str(m.dtype)),
            "host": platform.node(),
            "story": {
                "source": str(s.source) if s.source else None,
                "reference": str(s.reference),
                "mode": s.mode,
                "route": s.route,
                "route_options": {k: s.route_option(k) for k in ROUTES[s.route]},
                **motion,
                "width": s.width,
                "height": s.height,
                "fps": s.fps,
                "frames": s.frames,
                "steps": s.steps,
                "timesteps": s.timesteps,
                "guidance": s.guidance,
                "guidance_low": s.guidance_low,
                "shift": s.shift,
                "boundary": s.boundary,
                "seed": s.seed,
                "loras": self.loras.summary(),
            },
            "clips": [],
            "totals": {},
        }


def _entry_of(saved: dict) -> dict:
    """A checkpointed clip's report entry: the frames it puts in the video before any clip follows it."""
    entry = {k: v for k, v in saved.items() if k not in ("key", "files", "frames_body", "frames_tail")}
    entry["frames_kept"] = saved["frames_body"]
    return entry


def _clip_entry(clip: Clip) -> dict:
    return {
        "index": clip.index,
        "prompt": clip.prompt,
        "seed": clip.seed,
        "frames_kept": int(clip.frames.shape[0]),
        "keep": list(clip.keep),
        "seconds_denoise": round(clip.seconds_denoise, 4),
        "seconds_decode": round(clip.seconds_decode, 4),
        "seconds_compile": round(clip.seconds_compile, 4),
        "peak_memory_mb": round(clip.peak_memory_mb, 1),
    }


class _Totals:
    """Running totals of a report's clips (constant work per clip, however many clips there are)."""

    def __init__(self, fps: int, clips: list[dict] = ()):
        self.fps = fps
        self.clips = self.frames = 0
        self.denoise = self.decode = self.peak = self.compile = 0.0
        for c in clips:
            self.add(c)

    def add(self, c: dict) -> None:
        self.clips += 1
        self.frames += c["frames_kept"]
        self.denoise += c["seconds_denoise"]
        self.decode += c["seconds_decode"]
        self.compile += c.get("seconds_compile", 0.0)
        self.peak = max(self.peak, c["peak_memory_mb"])

    def value(self, seconds: float) -> dict:
        video_seconds = self.frames / self.fps
        return {
            "clips": self.clips,
            "frames": self.frames,
            "video_seconds": round(video_seconds, 4),
            "seconds": round(seconds, 4),
            "seconds_denoise": round(self.denoise, 4),
            "seconds_decode": round(self.decode, 4),
            "seconds_compile": round(self.compile, 4),
            "time_to_video": round(seconds / video_seconds, 6) if video_seconds else None,
            "peak_memory_mb": self.peak,
        }
