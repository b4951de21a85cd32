"""Training clips: ``F`` frames, a prompt, and where the motion memory ends.

Two sources, both drawing every choice from the ``torch.Generator`` they are given:

* :class:`ShapesWorldClips` generates long ShapesWorld sequences on the fly (the motion prompt
  changes at segment boundaries) and cuts a clip at a random offset; with ``boundary_prob`` the
  cut is placed so that the clip's motion memory is the tail of one segment and the rest follows
  the next prompt, which is exactly what a clip boundary with a new prompt looks like at inference;
  with ``wall_prob`` some prompts after the first run the subject into the frame edge, where it stops.
* :class:`VideoFolderClips` reads a folder of video files with PyAV (``x.mp4`` and an optional
  caption ``x.txt``), cuts a clip of ``F`` frames (every ``stride``-th) at a random offset and
  scales it to cover ``width x height``, cropping the centre.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import CliploomError
from ..video_io import cover_crop

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")


@dataclass
class DataClip:
    frames: np.ndarray  # uint8 [F, H, W, 3]
    prompt: str
    source: str  # where it came from, for logs
    offset: int = 0  # first frame's index in its sequence or file
    anchor: np.ndarray | None = None  # uint8 [1, H, W, 3]: a frame from anywhere in the source (far anchor)
    history: np.ndarray | None = None  # uint8 [h, H, W, 3]: the frames just before the clip (motion_source)
    motion: torch.Tensor | None = None  # [1, C, K, h, w]: motion latents a rollout handed on (closed loop)


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in ``[low, high]``."""
    return low + int(torch.randint(high - low + 1, (1,), generator=generator))


def _rand(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator))


class ShapesWorldClips:
    """Clips cut from freshly generated ShapesWorld sequences."""

    def __init__(self, frames: int, size: int, segments: int = 3, segment_frames: int | None = None,
                 boundary_prob: float = 0.5, wall_prob: float = 0.0, wall_move: str = "any"):
        self.frames = frames
        self.size = size
        self.segments = segments
        self.segment_frames = segment_frames or frames
        self.boundary_prob = boundary_prob
        self.wall_prob = wall_prob
        self.wall_move = wall_move
        if self.segments * self.segment_frames < frames:
            raise CliploomError(
                f"ShapesWorld sequences of {segments} x {self.segment_frames} frames are shorter than a {frames}-frame clip",
                "raise `segments` or `segment_frames`",
            )

    def clip(self, generator: torch.Generator, motion_pixels: int, far_anchor: str | None = None,
             history: int = 0) -> DataClip:
        """A clip whose first ``motion_pixels`` frames are its motion memory (with ``far_anchor``
        ``"any"``, a frame from anywhere in its sequence as ``anchor``; ``"past"``, a frame at or
        before the clip's last motion frame; ``"motion"``, that frame itself; with ``history``, that
        many frames before the clip as ``history``)."""
        from ..shapesworld import sample_sequence

        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        seq = sample_sequence(seed, self.segments, self.segment_frames, size=self.size, wall_prob=self.wall_prob,
                              wall_move=self.wall_move)
        total, F, L = seq.num_frames, self.frames, self.segment_frames
        starts = [b * L - motion_pixels for b in range(1, self.segments)]
        starts = [s for s in starts if history <= s and s + F <= total]
        if history + F > total:
            raise CliploomError(f"ShapesWorld sequences of {total} frames cannot hold {history} frames of history "
                                f"before a {F}-frame clip", "raise `segments` or `segment_frames`")
        if starts and _rand(generator) < self.boundary_prob:
            offset = starts[_randint(generator, 0, len(starts) - 1)]
        else:
            offset = _randint(generator, history, total - F)
        first_new = min(offset + motion_pixels, total - 1)
        prompt = next(s.prompt for s in seq.segments if s.start <= first_new < s.stop)
        anchor = None
        if far_anchor:
            last = total - 1 if far_anchor == "any" else offset + max(motion_pixels, 1) - 1
            k = last if far_anchor == "motion" else _randint(generator, 0, last)
            anchor = seq.frames(k, k + 1)
        past = seq.frames(offset - history, offset) if history else None
        return DataClip(seq.frames(offset, offset + F), prompt, f"shapesworld:{seed}@{offset}", offset, anchor, past)


def _caption(path: Path, default: str) -> str:
    txt = path.with_suffix(".txt")
    if txt.is_file():
        text = txt.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            return text
    return default


def count_frames(path: Path) -> int:
    """Frames in a video file (the container's count, else by decoding)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for _ in container.decode(video=0))


def read_frames(path: Path, start: int, count: int, stride: int = 1) -> list[Image.Image]:
    """Frames ``start, start + stride, ...`` (``count`` of them) of a video file as RGB images."""
    import av

    wanted = {start + i * stride for i in range(count)}
    last = start + (count - 1) * stride
    out: list[Image.Image] = []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                out.append(frame.to_image().convert("RGB"))
            if i >= last:
                break
    if len(out) != count:
        raise ValueError(f"{path} has fewer frames than its header says ({len(out)} of {count} read)")
    return out


class VideoFolderClips:
    """Clips cut at random offsets from the video files under a folder (searched recursively)."""

    def __init__(self, folder: str | Path, frames: int, width: int, height: int, stride: int = 1,
                 default_caption: str = ""):
        self.folder = Path(folder).expanduser()
        self.frames, self.width, self.height, self.stride = frames, width, height, stride
        if not self.folder.is_dir():
            raise CliploomError(f"video folder {self.folder} does not exist", "set `videos:` to a folder of mp4 files")
        files = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
        if not files:
            raise CliploomError(f"{self.folder} holds no video files", f"add {', '.join(VIDEO_SUFFIXES)} files")
        need = (frames - 1) * stride + 1
        self.videos: list[tuple[Path, int, str]] = []
        skipped = []
        for path in files:
            try:
                n = count_frames(path)
            except Exception as e:  # noqa: BLE001 - one unreadable file must not stop the run
                skipped.append(f"{path.name} ({type(e).__name__})")
                continue
            if n < need:
                skipped.append(f"{path.name} ({n} frames)")
                continue
            self.videos.append((path, n, _caption(path, default_caption)))
        if skipped:
            warnings.warn(f"skipping {len(skipped)} video(s) shorter than {need} frames or unreadable: "
                          f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}", stacklevel=2)
        if not self.videos:
            raise CliploomError(
                f"no video in {self.folder} has {need} frames ({frames} frames, stride {stride})",
                "use longer videos, fewer `frames` or a smaller `frame_stride`",
            )

    def clip(self, generator: torch.Generator, motion_pixels: int = 0, far_anchor: str | None = None,
             history: int = 0) -> DataClip:
        path, n, caption = self.videos[_randint(generator, 0, len(self.videos) - 1)]
        lo, hi = history * self.stride, n - ((self.frames - 1) * self.stride + 1)
        if lo > hi:
            raise CliploomError(f"{path.name} has {n} frames, too few for {history} frames of history before a clip",
                                "use longer videos or `motion_source: clip`")
        start = _randint(generator, lo, hi)
        images = read_frames(path, start - lo, history + self.frames, self.stride)
        frames = np.stack([np.asarray(cover_crop(im, self.width, self.height)) for im in images])
        past, frames = (frames[:history], frames[history:]) if history else (None, frames)
        anchor = None
        if far_anchor:  # "past": at or before the clip's last motion frame; "motion": that frame
            last = n - 1 if far_anchor == "any" else start + (max(motion_pixels, 1) - 1) * self.stride
            (image,) = read_frames(path, last if far_anchor == "motion" else _randint(generator, 0, last), 1)
            anchor = np.asarray(cover_crop(image, self.width, self.height))[None]
        return DataClip(frames, caption, f"{path.name}@{start}", start, anchor, past)
