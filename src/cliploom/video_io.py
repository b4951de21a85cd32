"""Reading reference images and writing videos as they are generated.

Writers append each clip as soon as it is decoded, so earlier frames are never held in
memory. Output goes to a temporary name (``x.mp4.partial`` or ``.DIR.partial/``) and is renamed
only when the whole video is done: a failed run leaves nothing that looks finished.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import CliploomError

PNG_PATTERN = "frame_{:05d}.png"


# -- input -----------------------------------------------------------------------------------------


MAX_IMAGE_PIXELS = 64_000_000  # a reference image is cover-cropped to the clip size; 64 MP is plenty
MAX_IMAGE_BYTES = 256 * 2**20


def load_image(path: str | Path, width: int | None = None, height: int | None = None,
               what: str = "reference image") -> Image.Image:
    """Open an RGB image; with a size, scale it to cover ``width x height`` and crop the centre.
    The header's size is checked before any pixel is decoded (no decompression bombs)."""
    import warnings

    from .inputs import check_regular

    fix = "pass the path of a PNG or JPEG file"
    path = check_regular(path, what, fix)
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise CliploomError(f"{what} {path} is larger than {MAX_IMAGE_BYTES // 2**20} MB", fix)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS or w < 1 or h < 1:
                    raise CliploomError(f"{what} {path} is {w}x{h}: more than {MAX_IMAGE_PIXELS // 10**6} "
                                        "megapixels (or empty)", "pass a smaller image")
                image = im.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise CliploomError(f"{what} {path} claims more than {MAX_IMAGE_PIXELS // 10**6} megapixels "
                            "(a decompression bomb)", "pass a smaller image") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise CliploomError(f"cannot read {what} {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                            "pass a valid PNG or JPEG file") from None
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
#
# Every file is written under a temporary name, flushed to disk and renamed into place: a crash
# at any instant leaves either the old file or the whole new one, never a torn file that looks
# finished (``*.partial`` names are never read back).


def _sync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(tmp: Path, path: Path) -> None:
    """Flush ``tmp`` to disk and rename it to ``path`` (atomic on one file system)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _sync_dir(path.parent)


def partial_name(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = partial_name(path)
    tmp.write_bytes(data)
    publish(tmp, path)


def write_json_atomic(path: Path, data: dict) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode())


def is_dir_target(out: str | Path) -> bool:
    """``DIR/`` (trailing slash), an existing directory, or a name without a video extension."""
    s = str(out)
    p = Path(s)
    return s.endswith(("/", os.sep)) or p.is_dir() or p.suffix.lower() not in (".mp4", ".mov", ".mkv")


MP4_OPTIONS = {"preset": "medium", "tune": "zerolatency"}  # no B-frames: every clip segment starts clean


def write_mp4(path: Path, frames: np.ndarray, fps: int, crf: int = 12) -> None:
    """H.264 MP4 of uint8 ``[n, H, W, 3]`` frames, written atomically. Segments written with the
    same size, fps and crf join without re-encoding (:func:`concat_mp4`)."""
    import av

    frames = np.asarray(frames)
    n, height, width = frames.shape[:3]
    if height % 2 or width % 2:
        raise CliploomError(f"H.264 needs even sizes, got {width}x{height}", "write PNGs with --out DIR/")
    tmp = partial_name(path)
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), **MP4_OPTIONS}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode(None))
    publish(tmp, path)


def concat_mp4(segments: list[Path], out: Path, fps: int) -> None:
    """Join MP4 segments into ``out`` (atomically) by copying their packets: no re-encoding, so each
    clip's bytes in the video are its segment's. Segments whose codec settings differ are decoded
    and encoded again instead."""
    import av

    if not segments:
        raise CliploomError("no frames were generated", "check the story's clips")
    tmp = partial_name(out)
    with av.open(str(segments[0])) as first:
        template = first.streams.video[0]
        extradata = template.codec_context.extradata
        same = all(_extradata(s) == extradata for s in segments[1:])
        if not same:
            tmp.unlink(missing_ok=True)
            write_mp4(out, np.concatenate([read_video(s) for s in segments]), fps)
            return
        with av.open(str(tmp), mode="w", format="mp4") as dst:
            stream = dst.add_stream_from_template(template)
            offset = 0
            for segment in segments:
                with av.open(str(segment)) as src:
                    end = offset
                    for packet in src.demux(src.streams.video[0]):
                        if packet.dts is None:  # the demuxer's end-of-stream marker
                            continue
                        packet.pts += offset
                        packet.dts += offset
                        end = max(end, packet.pts + (packet.duration or 0))
                        packet.stream = stream
                        dst.mux(packet)
                    offset = end
    publish(tmp, out)


def _extradata(path: Path) -> bytes | None:
    import av

    with av.open(str(path)) as c:
        return c.streams.video[0].codec_context.extradata


def write_pngs(folder: Path, frames: np.ndarray, first: int = 0) -> None:
    """``frame_{first:05d}.png ...`` into ``folder`` (each file written atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, frame in enumerate(np.asarray(frames)):
        path = folder / PNG_PATTERN.format(first + k)
        tmp = partial_name(path)
        Image.fromarray(frame).save(tmp, format="PNG")
        publish(tmp, path)


def check_writable(folder: Path) -> None:
    from .inputs import check_writable as check

    check(folder, "choose a writable --out")


VIDEO_SUFFIXES = (".mp4",)
OTHER_VIDEO_SUFFIXES = (".avi", ".gif", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".apng")


def check_output(out: str | Path, overwrite: bool = False) -> None:
    """Fail early (before any model is loaded) on an output that cannot be written: a name the OS
    refuses, a kind we do not write, a place that takes no files, or something in the way."""
    text = str(out)
    if not text.strip():
        raise CliploomError("the output name is empty", "pass --out video.mp4 or --out frames/")
    out = Path(text)
    for part in out.parts:
        if len(part.encode()) > 255:
            raise CliploomError(f"output name {part[:40]}... is {len(part.encode())} bytes, more than the 255 a file "
                                "name may have", "choose a shorter --out")
    suffix = out.suffix.lower()
    if not text.endswith(("/", os.sep)) and not out.is_dir() and suffix and suffix not in VIDEO_SUFFIXES:
        kind = "a video format cliploom does not write" if suffix in OTHER_VIDEO_SUFFIXES else "not a video name"
        raise CliploomError(f"output {out}: {suffix} is {kind}", "use x.mp4 (H.264) or DIR/ (PNG frames)")
    if is_dir_target(out):
        if out.exists() and not out.is_dir():
            raise CliploomError(f"{out} exists and is not a folder", "choose another --out")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise CliploomError(f"output folder {out} is not empty", "choose another --out or pass --overwrite")
        report = out / "report.json"
    else:
        if out.exists() and (out.is_dir() or not out.is_file()):
            raise CliploomError(f"{out} exists and is not a video file", "choose another --out")
        if out.exists() and not overwrite:
            raise CliploomError(f"{out} already exists", "choose another --out or pass --overwrite")
        report = out.with_suffix(".json")
        if report.exists() and not report.is_file():
            raise CliploomError(f"the report {report} would replace a folder", "choose another --out")
    check_writable(out.parent)
    del report
