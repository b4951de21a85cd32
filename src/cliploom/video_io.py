"""Reading reference images and writing videos as they are generated.

Writers append each clip as soon as it is decoded, so earlier frames are never held in
memory. Output goes to a temporary name (``x.mp4.partial`` or ``.DIR.partial/``) and is renamed
only when the whole video is done: a failed run leaves nothing that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import CliploomError

PNG_PATTERN = "frame_{:05d}.png"


# -- input -----------------------------------------------------------------------------------------


def load_image(path: str | Path, width: int | None = None, height: int | None = None) -> Image.Image:
    """Open an RGB image; with a size, scale it to cover ``width x height`` and crop the centre."""
    path = Path(path)
    if not path.is_file():
        raise CliploomError(f"reference image {path} does not exist", "pass the path of a PNG or JPEG file")
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise CliploomError(f"cannot read reference image {path}: {e}", "pass a valid PNG or JPEG file") from None
    if width is None or height is None:
        return image
    return cover_crop(image, width, height, Image.Resampling.LANCZOS)


def cover_crop(image: Image.Image, width: int, height: int, resample=Image.Resampling.BILINEAR) -> Image.Image:
    """Scale ``image`` to cover ``width x height``, then crop the centre (reference images, training videos)."""
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    image = image.resize((w, h), resample)
    left, top = (w - width) // 2, (h - height) // 2
    return image.crop((left, top, left + width, top + height))


def read_video(path: str | Path) -> np.ndarray:
    """All frames of an MP4 or a folder of ``frame_*.png`` as uint8 ``[F, H, W, 3]``."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("frame_*.png"))
        if not files:
            raise CliploomError(f"{path} holds no frame_*.png files", "pass a video or a folder written by cliploom")
        return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    import av

    try:
        with av.open(str(path)) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise CliploomError(f"cannot read video {path}: {e}", "pass an MP4 file or a PNG folder") from None


# -- output ----------------------------------------------------------------------------------------


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def is_dir_target(out: str | Path) -> bool:
    """``DIR/`` (trailing slash), an existing directory, or a name without a video extension."""
    s = str(out)
    p = Path(s)
    return s.endswith(("/", os.sep)) or p.is_dir() or p.suffix.lower() not in (".mp4", ".mov", ".mkv")


class VideoSink:
    """Appends frames to a video that becomes visible under its final name only at :meth:`finish`."""

    def __init__(self, out: Path, fps: int, overwrite: bool):
        self.out, self.fps, self.overwrite = out, fps, overwrite
        self.frames_written = 0

    @property
    def report_path(self) -> Path:
        raise NotImplementedError

    def append(self, frames: np.ndarray) -> None:
        raise NotImplementedError

    def finish(self, report: dict) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def write_progress(self, report: dict) -> None:
        """The report so far, beside the partial output (``*.partial``: clearly not finished)."""
        write_json_atomic(self.partial_report_path, report)

    @property
    def partial_report_path(self) -> Path:
        return self.report_path.with_name(self.report_path.name + ".partial")


class Mp4Sink(VideoSink):
    """H.264 MP4 through PyAV, muxed incrementally into ``x.mp4.partial``."""

    def __init__(self, out: Path, fps: int, overwrite: bool = False, crf: int = 12):
        super().__init__(out, fps, overwrite)
        if out.exists() and not overwrite:
            raise CliploomError(f"{out} already exists", "choose another --out or pass --overwrite")
        check_writable(out.parent)
        self.tmp = out.with_name(out.name + ".partial")
        self.crf = crf
        self.container = self.stream = None

    @property
    def report_path(self) -> Path:
        return self.out.with_suffix(".json")

    def _open(self, height: int, width: int) -> None:
        import av

        if height % 2 or width % 2:
            raise CliploomError(f"H.264 needs even sizes, got {width}x{height}", "write PNGs with --out DIR/")
        self.container = av.open(str(self.tmp), mode="w", format="mp4")
        self.stream = self.container.add_stream("libx264", rate=self.fps)
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p"
        # zerolatency: no lookahead and no B-frames, so each frame is muxed to disk as soon as
        # it is appended (true streaming) at the cost of a slightly larger file.
        self.stream.options = {"crf": str(self.crf), "preset": "medium", "tune": "zerolatency"}

    def append(self, frames: np.ndarray) -> None:
        import av

        frames = np.asarray(frames)
        if self.container is None:
            self._open(frames.shape[1], frames.shape[2])
        for frame in frames:
            for packet in self.stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                self.container.mux(packet)
        self.frames_written += len(frames)

    def finish(self, report: dict) -> None:
        if self.container is None:
            raise CliploomError("no frames were generated", "check the story's clips")
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()
        os.replace(self.tmp, self.out)
        write_json_atomic(self.report_path, report)
        self.partial_report_path.unlink(missing_ok=True)

    def abort(self) -> None:
        if self.container is not None:
            try:
                self.container.close()
            except Exception:  # noqa: BLE001 - already failing; cleaning up is best effort
                pass
        self.tmp.unlink(missing_ok=True)
        self.partial_report_path.unlink(missing_ok=True)


class PngSink(VideoSink):
    """Lossless PNGs ``frame_00000.png ...`` written per clip into ``.DIR.partial/``."""

    def __init__(self, out: Path, fps: int, overwrite: bool = False):
        super().__init__(out, fps, overwrite)
        if out.exists() and not out.is_dir():
            raise CliploomError(f"{out} exists and is not a folder", "choose another --out")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise CliploomError(f"output folder {out} is not empty", "choose another --out or pass --overwrite")
        out.parent.mkdir(parents=True, exist_ok=True)
        check_writable(out.parent)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))

    @property
    def report_path(self) -> Path:
        return self.out / "report.json"

    @property
    def partial_report_path(self) -> Path:
        return self.tmp / "report.json.partial"

    def append(self, frames: np.ndarray) -> None:
        for frame in np.asarray(frames):
            Image.fromarray(frame).save(self.tmp / PNG_PATTERN.format(self.frames_written))
            self.frames_written += 1

    def finish(self, report: dict) -> None:
        self.partial_report_path.unlink(missing_ok=True)
        write_json_atomic(self.tmp / "report.json", report)
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.tmp, self.out)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def check_writable(folder: Path) -> None:
    if not folder.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CliploomError(f"cannot create output folder {folder}: {e.strerror}", "choose a writable --out") from None
    if not os.access(folder, os.W_OK):
        raise CliploomError(f"output folder {folder} is not writable", "choose a writable --out")


def check_output(out: str | Path, overwrite: bool = False) -> None:
    """Fail early (before any model is loaded) on an output that cannot be written."""
    out = Path(out)
    if is_dir_target(out):
        if out.exists() and not out.is_dir():
            raise CliploomError(f"{out} exists and is not a folder", "choose another --out")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise CliploomError(f"output folder {out} is not empty", "choose another --out or pass --overwrite")
    elif out.exists() and not overwrite:
        raise CliploomError(f"{out} already exists", "choose another --out or pass --overwrite")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise CliploomError(f"cannot write {out}: {parent} is not a writable folder", "choose a writable --out")


def open_sink(out: str | Path, fps: int, overwrite: bool = False) -> VideoSink:
    """``x.mp4`` -> H.264 MP4 + ``x.json``; ``DIR/`` -> PNG frames + ``DIR/report.json``."""
    if is_dir_target(out):
        return PngSink(Path(out), fps, overwrite)
    return Mp4Sink(Path(out), fps, overwrite)
