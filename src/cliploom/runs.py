"""Run folders: a story's clips checkpointed one at a time, so that a run can be resumed after a
crash, re-run from clip N with new prompts or seeds, or extended with more clips, each giving the
frames an uninterrupted run gives (on the same machine).

    NAME.run/
      run.json                          what every clip depends on (model, reference, sampling)
      clips/000003.mp4                  clip 3's frames in the video (PNG output: clips/000003/)
      clips/000003.tail.mp4             pixel modes: its last N frames, in the video only while
                                        clip 3 is the story's last clip (the next one remakes them)
      clips/000003.memory.safetensors   the motion memory clip 4 continues from
      clips/000003.json                 written last: the clip's report entry; it makes the clip count

Every file is written under a ``*.partial`` name, flushed and renamed, the clip's JSON last, and a
clip counts only when its JSON names files that exist at the sizes it records: a crash at any
instant leaves whole clips only. The video itself is assembled from the segments by copying their
packets, so clips kept from an earlier run are kept byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CliploomError
from .loom import Clip, Start
from .story import Story
from .video_io import (
    PNG_PATTERN,
    concat_mp4,
    is_dir_target,
    partial_name,
    publish,
    write_json_atomic,
    write_mp4,
    write_pngs,
)

VERSION = 1


def run_folder_for(out: str | Path) -> Path:
    """``video.mp4`` -> ``video.run/``; ``frames/`` -> ``frames.run/``."""
    out = Path(str(out).rstrip("/"))
    return out.with_name((out.name if is_dir_target(out) else out.stem) + ".run")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def settings_key(story: Story, model) -> dict:
    """What every clip of a resolved story depends on besides its own prompt and seed."""
    return {
        "model": str(model.path),
        "family": model.settings.family,
        "dtype": str(model.dtype).replace("torch.", ""),
        "reference_sha256": file_digest(story.reference) if story.reference and Path(story.reference).is_file() else None,
        "mode": story.mode,
        "motion_latents": story.motion_latents if story.latent_motion else None,
        "motion_frames": None if story.latent_motion else story.motion_frames,
        "ref_pad": None if story.latent_motion else story.ref_pad,
        **{k: getattr(story, k) for k in ("width", "height", "frames", "steps", "timesteps", "guidance",
                                          "guidance_low", "shift", "boundary", "negative_prompt", "fps")},
        "loras": [{"name": lo.name, "weight": lo.weight, "expert": lo.expert,
                   "bytes": Path(lo.path).stat().st_size if Path(lo.path).is_file() else None} for lo in story.loras],
        "svi_lora": story.svi_lora and bool(model.settings.svi_lora),
        # keyed only when the keyframe LoRA runs, so that run folders from before it still resume
        **({"keyframe_lora": own} if (own := model.settings.svi_lora_for(story)) and own == model.settings.keyframe_lora
           else {}),
        "fuse_loras": story.fuse_loras,
        # later options, keyed only when set so that run folders from before them still resume
        **({"route": story.route, "route_options": dict(sorted(story.route_options.items()))}
           if story.route != "svi" else {}),
        **({"motion_amplitude": story.motion_amplitude} if story.motion_amplitude not in (None, 1) else {}),
        **({"keyframe_guidance": story.keyframe_guidance}
           if story.keyframe_guidance not in (None, 1) and any(c.keyframes for c in story.clips) else {}),
        **({"memory_guidance": story.memory_guidance} if story.memory_guidance not in (None, 1) else {}),
        **({"anchor": story.anchor} if story.anchor != "reference" else {}),
        **({"memory_from": story.memory_from} if story.memory_from not in (None, "latents") else {}),
        **({"first_clip": story.first_clip} if story.first_clip != "pro" else {}),
        **({"sampler": story.sampler} if story.sampler not in (None, "euler") else {}),
        **({"color_match_method": story.color_match_method}
           if story.color_match not in (None, "none") and story.color_match_method not in (None, "mean_std") else {}),
    }


def clip_key(story: Story, i: int) -> dict:
    """What clip ``i`` depends on of its own."""
    key = {"prompt": story.prompt(i), "seed": story.clip_seed(i), "loras": story.clips[i].lora_weights}
    if story.clips[i].keyframes:  # a clip with keyframes depends on them (and their images' bytes)
        key["keyframes"] = [{"frame": k.frame, "image": Path(k.image).name,
                             "bytes": Path(k.image).stat().st_size if Path(k.image).is_file() else None}
                            for k in story.clips[i].keyframes]
    return key


@dataclass
class SavedClip:
    index: int
    entry: dict  # the clip's report entry plus what the run needs (segment names, sizes, key)


class Run:
    """One run folder. ``png`` runs keep PNG segments (lossless output), others MP4 segments."""

    def __init__(self, folder: str | Path, png: bool = False):
        self.folder = Path(folder)
        self.clips_dir = self.folder / "clips"
        self.png = png

    # -- reading ------------------------------------------------------------------------------
    def header(self) -> dict | None:
        path = self.folder / "run.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def saved(self) -> list[SavedClip]:
        """The whole clips 0, 1, 2 ... in order, up to the first missing or torn one."""
        out: list[SavedClip] = []
        while True:
            i = len(out)
            try:
                entry = json.loads((self.clips_dir / f"{i:06d}.json").read_text())
            except (OSError, ValueError):
                return out
            if not isinstance(entry, dict) or not self._files_whole(entry):
                return out
            out.append(SavedClip(i, entry))

    def _files_whole(self, entry: dict) -> bool:
        for name, size in (entry.get("files") or {}).items():
            path = self.clips_dir / name
            if path.is_dir():
                count = len(list(path.glob("frame_*.png")))
                if count != size:
                    return False
            elif not path.is_file() or path.stat().st_size != size:
                return False
        return bool(entry.get("files"))

    def memory(self, i: int) -> torch.Tensor:
        """The motion memory clip ``i + 1`` continues from."""
        path = self.clips_dir / f"{i:06d}.memory.safetensors"
        with safe_open(str(path), "pt") as f:
            return f.get_tensor("memory")

    def anchor_frame(self, i: int) -> torch.Tensor | None:
        """The frame clip ``i + 1`` is anchored on (``anchor: last_frame``); ``None`` if not kept."""
        path = self.clips_dir / f"{i:06d}.memory.safetensors"
        with safe_open(str(path), "pt") as f:
            return f.get_tensor("anchor_next") if "anchor_next" in f.keys() else None

    # -- preparing ----------------------------------------------------------------------------
    def prepare(self, story: Story, model, *, resume: bool = False, from_clip: int | None = None,
                overwrite: bool = False, name: str = "") -> Start:
        """Check the folder against ``story`` and return where generation starts.

        New run: the folder must hold no clips (``overwrite`` clears it). ``resume``: keep every
        saved clip the story still asks for, continue after them. ``from_clip=N``: keep clips
        0..N-1 (they must be unchanged), generate from clip N on."""
        settings = settings_key(story, model)
        where = name or str(self.folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise CliploomError(f"{where}: the run folder {self.folder} is a file", "move it away or choose another --out")
        saved = self.saved()
        if resume or from_clip is not None:
            header = self.header()
            if header is None:
                raise CliploomError(f"{where}: no run to continue (no {self.folder}/run.json)",
                                    "run without --resume/--from-clip to start one")
            # every key either side has: an option keyed only when set (keyframe_lora, anchor, ...) that
            # the run had and the story no longer has is a change too; absent on both sides is equal
            before = header.get("settings", {})
            changed = [k for k in sorted(settings.keys() | before.keys()) if before.get(k) != settings.get(k)]
            if changed:
                k = changed[0]
                raise CliploomError(
                    f"{where}: the story's {k} changed since the run ({before.get(k)!r} -> {settings.get(k)!r})",
                    "restore it, or start over with --overwrite")
            if header.get("png") != self.png:
                raise CliploomError(f"{where}: the run wrote {'PNG' if header.get('png') else 'MP4'} segments",
                                    "keep the output kind of the run (x.mp4 or DIR/)")
            keep = len(saved) if from_clip is None else from_clip
            if from_clip is not None and not 0 <= from_clip <= len(saved):
                raise CliploomError(f"{where}: --from-clip {from_clip} but the run has {len(saved)} finished clips",
                                    f"use 0..{len(saved)}")
            if keep > len(story.clips):
                raise CliploomError(f"{where}: the run has {keep} clips, the story only {len(story.clips)}",
                                    f"re-run with --from-clip {len(story.clips)} or give the story more clips")
            for clip in saved[:keep]:
                if clip.entry.get("key") != clip_key(story, clip.index):
                    raise CliploomError(f"{where}: clip {clip.index} changed since the run (prompt or seed)",
                                        f"use --from-clip {clip.index} to re-run from there")
            self.drop_from(keep)
        else:
            if saved and not overwrite:
                raise CliploomError(
                    f"{where}: {self.folder} holds {len(saved)} finished clips of an earlier run",
                    "pass --resume to continue it, --from-clip N to re-run from clip N, or --overwrite to start over")
            if self.folder.exists():
                shutil.rmtree(self.folder)
            keep = 0
        self.clips_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.folder / "run.json", {"version": VERSION, "png": self.png, "settings": settings})
        return Start(keep, self.memory(keep - 1) if keep else None, self.anchor_frame(keep - 1) if keep else None)

    def adopt(self, story: Story, model, frames: np.ndarray, prompt: str) -> None:
        """Start a run whose clip 0 is an existing video (an uploaded file to extend). Pixel modes: its
        last N frames become the motion memory and the first clip's regenerated tail. Pro mode
        (``memory_from: frames`` only): its last clip's worth of frames encoded as the loop encodes a
        decoded clip (``loom.encode_memory``) becomes the motion memory, and with ``anchor: last_frame``
        its last frame the next anchor; the video is kept whole (the next clip drops the frames that
        re-create the memory)."""
        from .loom import encode_memory
        from .models.components import frames_to_tensor

        if story.latent_motion and story.memory_from != "frames":
            raise CliploomError("an uploaded video has no saved motion latents to continue from in pro mode",
                                "set memory_from: frames (its last frames encoded), or use a pixel mode such as svi2")
        n = 0 if story.latent_motion else story.motion_frames  # the tail the next clip regenerates
        need = story.frames if story.latent_motion else n + 1
        if len(frames) < need:
            raise CliploomError(f"the video has {len(frames)} frames; extending it needs at least {need}",
                                "send a longer video")
        if story.latent_motion:
            kept = {"memory": encode_memory(model, torch.as_tensor(frames[-story.frames:]),
                                            story.motion_latents).to("cpu").contiguous()}
            if story.anchor == "last_frame":
                kept["anchor_next"] = torch.as_tensor(frames[-1]).contiguous()
        else:
            kept = {"memory": frames_to_tensor(frames[-n:]).contiguous()}
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.clips_dir.mkdir(parents=True)
        write_json_atomic(self.folder / "run.json",
                          {"version": VERSION, "png": self.png, "settings": settings_key(story, model)})
        files = self._segment("000000", frames[: len(frames) - n], story.fps)
        if n:
            files.update(self._segment("000000.tail", frames[-n:], story.fps))
        memory = self.clips_dir / "000000.memory.safetensors"
        save_file(kept, str(partial_name(memory)))
        publish(partial_name(memory), memory)
        files[memory.name] = memory.stat().st_size
        entry = {"index": 0, "prompt": prompt, "seed": story.clip_seed(0), "frames_kept": len(frames) - n,
                 "keep": [0, len(frames) - n], "uploaded": True, "seconds_denoise": 0.0, "seconds_decode": 0.0,
                 "peak_memory_mb": 0.0, "frames_body": len(frames) - n, "frames_tail": n,
                 "key": clip_key(story, 0), "files": files}
        write_json_atomic(self.clips_dir / "000000.json", entry)

    def drop_from(self, n: int) -> None:
        """Forget clips ``n, n+1, ...`` (their JSON first, so a crash midway leaves whole clips)."""
        for entry in sorted(self.clips_dir.glob("*.json"), reverse=True):
            stem = entry.name.split(".")[0]
            if stem.isdigit() and int(stem) >= n:
                entry.unlink()
        for path in sorted(self.clips_dir.glob("*")):
            stem = path.name.split(".")[0]
            if stem.isdigit() and int(stem) >= n or path.name.endswith(".partial"):
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    # -- writing ------------------------------------------------------------------------------
    def save(self, clip: Clip, story: Story, entry: dict) -> SavedClip:
        """Checkpoint a finished clip: segments, motion memory, then its JSON."""
        i = clip.index
        frames = clip.frames.numpy()
        files: dict[str, int] = {}
        tail = None
        if clip.tail is not None:
            tail = clip.tail.numpy()
            if clip.keep[1] == story.frames:  # the story's last clip kept its tail: store it apart
                frames = frames[: len(frames) - len(tail)]
        files.update(self._segment(f"{i:06d}", frames, story.fps))
        if tail is not None:
            files.update(self._segment(f"{i:06d}.tail", tail, story.fps))
        memory = self.clips_dir / f"{i:06d}.memory.safetensors"
        kept = {"memory": clip.memory.detach().to("cpu").contiguous()}
        if clip.anchor_next is not None:  # re-anchoring: the frame the next clip is anchored on
            kept["anchor_next"] = clip.anchor_next.to("cpu").contiguous()
        save_file(kept, str(partial_name(memory)))
        publish(partial_name(memory), memory)
        files[memory.name] = memory.stat().st_size
        full = {**entry, "frames_body": len(frames), "frames_tail": 0 if tail is None else len(tail),
                "key": clip_key(story, i), "files": files}
        write_json_atomic(self.clips_dir / f"{i:06d}.json", full)
        return SavedClip(i, full)

    def _segment(self, stem: str, frames: np.ndarray, fps: int) -> dict[str, int]:
        if self.png:
            folder = self.clips_dir / stem
            if folder.exists():
                shutil.rmtree(folder)
            write_pngs(folder, frames)
            return {stem: len(frames)}
        path = self.clips_dir / f"{stem}.mp4"
        write_mp4(path, frames, fps)
        return {path.name: path.stat().st_size}

    def segments(self, n: int) -> list[Path]:
        """The segments of a video of clips 0..n-1: every body, and the last clip's tail."""
        ext = "" if self.png else ".mp4"
        out = [self.clips_dir / f"{i:06d}{ext}" for i in range(n)]
        if n and (self.clips_dir / f"{n - 1:06d}.tail{ext}").exists():
            out.append(self.clips_dir / f"{n - 1:06d}.tail{ext}")
        return [p for p in out if (p.exists() if self.png else p.is_file())]

    def assemble(self, out: Path, n: int, fps: int, report: dict) -> Path:
        """Write the video of clips 0..n-1 to ``out`` and its report (``x.json`` beside an MP4,
        ``DIR/report.json`` in a PNG folder), each atomically; returns the report's path."""
        segments = self.segments(n)
        if not self.png:
            concat_mp4(segments, out, fps)
            report_path = out.with_suffix(".json")
            write_json_atomic(report_path, report)
            return report_path
        tmp = out.with_name(f".{out.name}.partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        count = 0
        for folder in segments:
            for frame in sorted(folder.glob("frame_*.png")):
                target = tmp / PNG_PATTERN.format(count)
                try:
                    target.hardlink_to(frame)  # PNG segments are immutable once written
                except OSError:
                    shutil.copyfile(frame, target)
                count += 1
        write_json_atomic(tmp / "report.json", report)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        return out / "report.json"
