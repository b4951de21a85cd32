"""Score a generated ShapesWorld video against what its prompts say.

Each clip's prompt names the subject's colour, shape and size, the background and the motion;
clip boundaries come from the number of frames each clip kept in the final video. The anchor
is the video's first frame (the reference image the story starts from). Per clip we measure:

- **color drift**: CIEDE2000 between the subject's colour in the clip and in the anchor;
- **background drift**: CIEDE2000 between the background's colour in the clip and the anchor;
- **area**: the subject's area (largest connected component) relative to the anchor's, and
  whether it is *kept*, *lost* (gone or tiny), *split* (two or more big pieces) or *resized*;
- **motion**: the subject centroid's displacement over the clip against the prompted motion
  (direction and at least part of the expected travel; staying put for ``stays still``;
  rising and falling for ``bounces``; each as the world would show it from where the clip starts,
  stopped by the frame edge);
- **sharpness**: a re-blur sharpness ratio against the anchor's (the median over the video's
  first frames, which averages out sub-pixel edge phase), and the background's noise level
  against the anchor's (blur or noise = restoration shift);
- **boundary jump**: the mean absolute frame difference across the clip's starting boundary
  divided by the in-clip frame difference next to it (the larger of the medians over the
  last few frame pairs before the boundary and the first few after it).

A clip passes when every measurable check passes; a video passes when all its clips do. The
thresholds are the constants below; docs/shapesworld.md explains each one. Lengths in pixels
are given for the 32-pixel reference canvas and scale with the frame width.

Pixel classification: every frame's pixels are assigned to the nearest of a small set of
colour centres (subject, background and stripe colours, the gray block), first placed from the
palette the prompt names, refined on the anchor and then tracked from frame to frame, so a
slow colour drift is followed and measured rather than mistaken for a lost subject. A pixel
far from every background centre counts as subject whatever its colour.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .drift import seam_jumps
from .shapesworld import world as _world
from .shapesworld.color import delta_e2000, srgb_to_lab
from .shapesworld.vocab import (
    BACKGROUND_COLORS,
    DISTRACTOR_COLOR,
    STRIPE_LIGHTEN,
    SUBJECT_COLORS,
    PromptSpec,
    parse_prompt,
)

# ----- thresholds (see docs/shapesworld.md) -----------------------------------------------
SUBJECT_DELTA_E_MAX = 10.0  # ΔE2000: a plainly visible change of the subject's colour fails
BACKGROUND_DELTA_E_MAX = 8.0  # ΔE2000 for the background, which covers most of the frame
AREA_KEPT_RANGE = (0.5, 2.0)  # subject area / anchor area for "kept"
LOST_AREA_RATIO = 0.25  # below this (or no subject pixels) the subject is lost in that frame
SPLIT_PIECE_RATIO = 0.25  # a second component this big (of anchor area) means "split"
BAD_FRAME_FRACTION = 0.25  # a clip is lost/split when this share of its frames is
MOTION_MIN_FRACTION = 0.5  # a directed move must cover half the travel the world would show
DIRECTION_COS_MIN = 0.8  # and point within ~37 degrees of the prompted direction
STILL_MAX_PX = 2.0  # "stays still": net displacement at most this (32-px reference canvas)
BOUNCE_MIN_RISE = 0.5  # "bounces": vertical range at least this share of the hop height
BOUNCE_MAX_DRIFT_PX = 3.0  # ... while drifting sideways no more than this
SHARPNESS_RANGE = (0.7, 1.4)  # re-blur sharpness / the anchor's: blur below, ringing/noise above
SHARPNESS_REFERENCE_FRAMES = 8  # the anchor's sharpness: median over the video's first frames
NOISE_MAX_INCREASE = 3.0  # background pixels' median deviation from their colour, 0..255, vs anchor
JUMP_MAX = 4.0  # boundary difference / median in-clip difference
JUMP_WINDOW = 4  # in-clip differences compared: this many frame pairs on each side
JUMP_FLOOR = 0.5  # in-clip difference floor (mean |Δ| in 0..255) so still videos do not divide by ~0
FAR_FROM_BACKGROUND = 25.0  # ΔE76 from every background centre: subject whatever its colour

THRESHOLDS = {
    "subject_delta_e_max": SUBJECT_DELTA_E_MAX,
    "background_delta_e_max": BACKGROUND_DELTA_E_MAX,
    "area_kept_range": list(AREA_KEPT_RANGE),
    "lost_area_ratio": LOST_AREA_RATIO,
    "split_piece_ratio": SPLIT_PIECE_RATIO,
    "bad_frame_fraction": BAD_FRAME_FRACTION,
    "motion_min_fraction": MOTION_MIN_FRACTION,
    "direction_cos_min": DIRECTION_COS_MIN,
    "still_max_px": STILL_MAX_PX,
    "bounce_min_rise": BOUNCE_MIN_RISE,
    "bounce_max_drift_px": BOUNCE_MAX_DRIFT_PX,
    "sharpness_range": list(SHARPNESS_RANGE),
    "sharpness_reference_frames": SHARPNESS_REFERENCE_FRAMES,
    "noise_max_increase": NOISE_MAX_INCREASE,
    "jump_max": JUMP_MAX,
    "jump_window": JUMP_WINDOW,
    "jump_floor": JUMP_FLOOR,
}


# ----- reading ------------------------------------------------------------------------------
def read_frames(source) -> np.ndarray:
    """Frames ``[N, H, W, 3]`` uint8 from an MP4 path, a folder of PNGs, an array or an iterable."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            files = sorted(path.glob("frame_*.png")) or sorted(path.glob("*.png"))
            if not files:
                raise ValueError(f"no frame_*.png files in {path}; pass an MP4 or a folder of PNG frames")
            from PIL import Image

            return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
        if not path.is_file():
            raise ValueError(f"video {path} not found; pass an MP4 file or a folder of frame_00000.png files")
        import av

        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        if not frames:
            raise ValueError(f"video {path} has no frames; regenerate it")
        return np.stack(frames)
    if isinstance(source, np.ndarray):
        arr = source
    else:
        arr = np.stack([np.asarray(f) for f in source])
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must be [N, H, W, 3] RGB, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return arr


def find_report(video_path) -> Path | None:
    """The engine's JSON report beside a video: ``x.json`` for ``x.mp4``, ``DIR/report.json``."""
    path = Path(video_path)
    for cand in (path / "report.json", path.with_suffix(".json")):
        if cand.is_file() and cand != path:
            return cand
    return None


def clips_from_report(report: dict | str | Path) -> tuple[list[str], list[int]]:
    """(prompts, frames kept per clip) from an engine report (a dict or a JSON file)."""
    if not isinstance(report, dict):
        report = json.loads(Path(report).read_text())
    clips = report.get("clips")
    if not isinstance(clips, list) or not clips:
        raise ValueError("the report has no 'clips' list; pass prompts and clip_lengths explicitly")
    prompts, lengths = [], []
    for i, clip in enumerate(clips):
        if "prompt" not in clip or "frames_kept" not in clip:
            raise ValueError(f"report clip {i} lacks 'prompt' or 'frames_kept'; regenerate the report or pass them explicitly")
        prompts.append(str(clip["prompt"]))
        lengths.append(int(clip["frames_kept"]))
    return prompts, lengths


def clips_from_story(story, num_frames: int) -> tuple[list[str], list[int]]:
    """(prompts, frames kept per clip) of a :class:`~cliploom.story.Story` rendered to ``num_frames``.

    The frames per clip come from the story; when it leaves them to the model's defaults they are
    worked out from the video's length (latent mode drops ``1 + 4K`` frames from every clip after
    the first, pixel modes ``N`` from every clip before the last: ``total = n F - (n - 1) drop``,
    with ``F = 4k + 1`` as for every Wan model).
    """
    import dataclasses

    n = len(story.clips)
    prompts = [story.prompt(i) for i in range(n)]
    frames = story.frames
    if frames is None:
        drop = 1 + 4 * story.motion_latents if story.latent_motion else story.motion_frames
        frames, rest = divmod(num_frames + (n - 1) * drop, n)
        if rest or frames <= drop or (frames - 1) % 4:
            raise ValueError(
                f"a {n}-clip story in {story.mode} mode cannot make a {num_frames}-frame video "
                "(no clip length of 4k+1 frames fits)"
            )
    resolved = dataclasses.replace(story, frames=frames)
    lengths = [b - a for a, b in (resolved.frames_kept(i) for i in range(n))]
    return prompts, lengths


# ----- measuring ----------------------------------------------------------------------------
def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean image: (labels, count); label 0 is the background."""
    H, W = mask.shape
    big = H * W + 1
    labels = np.where(mask, np.arange(1, H * W + 1).reshape(H, W), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neigh = labels.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                neigh = np.minimum(neigh, padded[1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W])
        new = np.where(mask, neigh, big)
        if np.array_equal(new, labels):
            break
        labels = new
    uniq = np.unique(labels[mask])
    relabeled = np.zeros((H, W), dtype=np.int32)
    if uniq.size:
        relabeled[mask] = np.searchsorted(uniq, labels[mask]) + 1
    return relabeled, int(uniq.size)


def _luma(frame: np.ndarray) -> np.ndarray:
    return frame.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def _gradient_energy(y: np.ndarray) -> float:
    return float(np.mean(np.diff(y, axis=0) ** 2) + np.mean(np.diff(y, axis=1) ** 2))


def _blur121(y: np.ndarray) -> np.ndarray:
    p = np.pad(y, 1, mode="edge")
    h = (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4
    return (h[:-2] + 2 * h[1:-1] + h[2:]) / 4


def sharpness(frame: np.ndarray) -> float:
    """How much of a frame's gradient energy a further [1,2,1] blur removes (0..1).

    A sharp frame loses most of it; an already blurred one little. Being a ratio within one
    frame, it does not depend on how many edges the scene has or how contrasted they are
    (plain gradient energy does: it halves when the subject covers the gray block).
    """
    y = _luma(frame)
    energy = _gradient_energy(y)
    if energy < 1e-9:
        return 0.0
    return 1.0 - _gradient_energy(_blur121(y)) / energy


@dataclass
class _Centres:
    """Colour centres (Lab): the subject, background colours, the gray block."""

    subject: np.ndarray
    backgrounds: list[np.ndarray]
    distractor: np.ndarray | None

    def all(self) -> np.ndarray:
        rows = [self.subject] + self.backgrounds + ([self.distractor] if self.distractor is not None else [])
        return np.stack(rows)


def _initial_centres(spec: PromptSpec) -> _Centres:
    base = np.array(BACKGROUND_COLORS[spec.background], dtype=np.float64)
    bgs = [base] + ([base * (1 - STRIPE_LIGHTEN) + 255 * STRIPE_LIGHTEN] if spec.striped else [])
    return _Centres(
        srgb_to_lab(SUBJECT_COLORS[spec.color]),
        [srgb_to_lab(c) for c in bgs],
        srgb_to_lab(DISTRACTOR_COLOR) if spec.distractor else None,
    )


def _classify(lab: np.ndarray, centres: _Centres) -> np.ndarray:
    """Class per pixel: 0 subject, 1..k background centres, k+1 gray block."""
    c = centres.all()
    dist = np.linalg.norm(lab[..., None, :] - c, axis=-1)
    cls = dist.argmin(-1)
    nb = len(centres.backgrounds)
    far = dist[..., 1 : 1 + nb].min(-1) > FAR_FROM_BACKGROUND
    if centres.distractor is not None:
        far &= dist[..., 1 + nb] > FAR_FROM_BACKGROUND
    return np.where(far, 0, cls)


def _core(mask: np.ndarray) -> np.ndarray:
    """The mask eroded by one pixel (4-neighbourhood), or the mask itself if that empties it."""
    p = np.pad(mask, 1)
    core = mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return core if core.any() else mask


@dataclass
class _FrameMeasure:
    subject_rgb: np.ndarray | None
    background_rgb: np.ndarray
    area: float
    second_area: float
    centroid: np.ndarray  # (x, y) px, NaN when no subject
    sharpness: float
    noise: float  # median |pixel - its background colour| over background pixels, 0..255


def _measure_frames(frames: np.ndarray, spec: PromptSpec) -> list[_FrameMeasure]:
    centres = _initial_centres(spec)
    H, W = frames.shape[1:3]
    ys, xs = np.mgrid[0:H, 0:W] + 0.5
    out = []
    for k, frame in enumerate(frames):
        lab = srgb_to_lab(frame)
        for _ in range(3 if k == 0 else 1):  # refine on the anchor, then track frame to frame
            cls = _classify(lab, centres)
            if (cls == 0).any():
                centres.subject = np.median(lab[_core(cls == 0)], axis=0)
            for j in range(len(centres.backgrounds)):
                if (cls == 1 + j).any():
                    centres.backgrounds[j] = lab[cls == 1 + j].mean(0)
            if centres.distractor is not None and (cls == len(centres.all()) - 1).any():
                centres.distractor = lab[cls == len(centres.all()) - 1].mean(0)
        cls = _classify(lab, centres)
        subject = cls == 0
        labels, n = connected_components(subject)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:] if n else np.zeros(0)
        order = np.argsort(sizes)[::-1]
        if n:
            main = labels == order[0] + 1
            centroid = np.array([xs[main].mean(), ys[main].mean()])
            subject_rgb = np.median(frame[_core(main)].astype(np.float64), axis=0)
        else:
            main, centroid, subject_rgb = subject, np.array([np.nan, np.nan]), None
        bg = (cls >= 1) & (cls <= len(centres.backgrounds))
        background_rgb = frame[bg].astype(np.float64).mean(0) if bg.any() else frame.reshape(-1, 3).mean(0)
        deviation = [
            np.abs(frame[cls == 1 + j].astype(np.float64) - frame[cls == 1 + j].mean(0)).mean(-1)
            for j in range(len(centres.backgrounds))
            if (cls == 1 + j).any()
        ]
        noise = float(np.median(np.concatenate(deviation))) if deviation else 0.0
        out.append(
            _FrameMeasure(
                subject_rgb,
                background_rgb,
                float(sizes[order[0]]) if n else 0.0,
                float(sizes[order[1]]) if n > 1 else 0.0,
                centroid,
                sharpness(frame),
                noise,
            )
        )
    return out


def subject_centroids(frames: np.ndarray, spec: PromptSpec) -> np.ndarray:
    """The subject's centre ``[n, 2]`` (x, y px; NaN where no subject) in ``frames`` (uint8 ``[n, H,
    W, 3]``), tracked from the first frame as the evaluator tracks a clip."""
    return np.stack([m.centroid for m in _measure_frames(frames, spec)])


def _expected_motion(spec: PromptSpec, start: np.ndarray, steps: int, scale: float) -> np.ndarray:
    """The displacement (px) the world would show: prompted velocity, stopped by the frame edge."""
    if spec.motion not in _world._VELOCITY:
        return np.zeros(2)
    u = np.array(_world._VELOCITY[spec.motion])
    lo, hi = (b * scale for b in _world.bounds(spec))
    room = np.inf if np.isnan(start).any() else _world.room(spec.motion, start, lo, hi)
    travel = min(_world.SPEED * scale * steps, max(0.0, room))
    return u * travel


def _expected_rise(spec: PromptSpec, start: np.ndarray, steps: int, scale: float) -> float:
    """The hop (px) the world would show over ``steps`` frames of ``bounces`` from ``start``: the
    highest point of the hop the clip reaches, stopped by the top edge as the world stops it."""
    t = np.arange(steps + 1)
    hop = float(-_world.motion_offset("bounce", t)[:, 1].min()) * scale
    if np.isnan(start).any():
        return hop
    lo = _world.bounds(spec)[0] * scale
    return min(hop, max(0.0, float(start[1]) - lo))


def _pinned(d: np.ndarray, allowed: float, scale: float) -> bool:
    """Held by the frame edge, as the world holds it: net motion ``d`` within the still rule's
    jitter plus the ``allowed`` px the world would still show."""
    return bool(np.linalg.norm(d) <= STILL_MAX_PX * scale + allowed)


def _motion_check(spec: PromptSpec, cents: np.ndarray, scale: float) -> dict:
    """Judge a clip's centroid track ``[n, 2]`` against its prompted motion."""
    valid = ~np.isnan(cents[:, 0])
    if valid.sum() < 2:
        return {"ok": None, "displacement": None, "expected": None, "reason": "no subject to track"}
    idx = np.flatnonzero(valid)
    a, b = idx[0], idx[-1]
    first = cents[idx[: max(1, min(3, idx.size // 4))]]
    head = first.mean(0)
    tail = cents[idx[-max(1, min(3, idx.size // 4)) :]].mean(0)
    d = tail - head
    steps = b - a
    info = {"displacement": d.round(3).tolist()}
    if spec.motion in _world._VELOCITY:
        expected = _expected_motion(spec, head, steps, scale)
        length = float(np.linalg.norm(expected))
        info["expected"] = expected.round(3).tolist()
        if length < 1.0 * scale:  # against the wall already: nothing measurable to demand
            ok = _pinned(d, length, scale)
        else:
            u = expected / length
            along = float(np.dot(d, u))
            cos = along / max(float(np.linalg.norm(d)), 1e-9)
            ok = along >= MOTION_MIN_FRACTION * length and cos >= DIRECTION_COS_MIN
        info["ok"] = bool(ok)
    elif spec.motion == "still":
        info["expected"] = [0.0, 0.0]
        info["ok"] = bool(np.linalg.norm(d) <= STILL_MAX_PX * scale)
    else:  # bounce
        rise = float(np.ptp(cents[valid, 1]))
        rest = np.array([head[0], first[:, 1].max()])  # a hop only rises: its lowest first frame is its rest
        expected_rise = _expected_rise(spec, rest, steps, scale)
        info["expected"] = [0.0, 0.0]
        info["vertical_range"] = round(rise, 3)
        info["expected_rise"] = round(expected_rise, 3)
        sideways = abs(d[0]) <= BOUNCE_MAX_DRIFT_PX * scale
        if expected_rise < 1.0 * scale:  # against the top edge: the world shows no hop to demand
            ok = sideways and _pinned(d, expected_rise, scale)
        else:
            ok = sideways and rise >= BOUNCE_MIN_RISE * expected_rise
        info["ok"] = bool(ok)
    return info


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def evaluate_video(
    source,
    story_like: dict | str | Path | None = None,
    *,
    prompts: list[str] | None = None,
    clip_lengths: list[int] | None = None,
) -> dict:
    """Score a video (path, frames array or iterable) against its per-clip prompts.

    Clip boundaries and prompts come from ``story_like`` (an engine report dict or JSON path
    with ``clips[i].prompt`` / ``clips[i].frames_kept``), from explicit ``prompts`` and
    ``clip_lengths``, or, for a path, from the report found beside the video. Returns a
    JSON-serialisable dict (see docs/shapesworld.md).
    """
    frames = read_frames(source)
    if prompts is None or clip_lengths is None:
        if story_like is None and isinstance(source, (str, Path)):
            story_like = find_report(source)
        if story_like is None:
            raise ValueError("no clip prompts/boundaries: pass a report, or prompts and clip_lengths")
        prompts, clip_lengths = clips_from_report(story_like)
    prompts, clip_lengths = list(prompts), [int(n) for n in clip_lengths]
    if len(prompts) != len(clip_lengths) or not prompts:
        raise ValueError(f"got {len(prompts)} prompts for {len(clip_lengths)} clip lengths; give one prompt per clip")
    if any(n < 1 for n in clip_lengths):
        raise ValueError(f"clip lengths must be >= 1 frame, got {clip_lengths}")
    if sum(clip_lengths) != len(frames):
        raise ValueError(
            f"the clips add up to {sum(clip_lengths)} frames but the video has {len(frames)}; "
            "pass the frames each clip kept in the final video"
        )
    specs = [parse_prompt(p) for p in prompts]
    H, W = frames.shape[1:3]
    scale = W / _world.REF
    measures = _measure_frames(frames, specs[0])
    anchor = measures[0]
    if anchor.subject_rgb is None or anchor.area == 0:
        raise ValueError("no subject found in the video's first frame; is it a ShapesWorld video for these prompts?")

    subj_de = np.array(
        [float(delta_e2000(m.subject_rgb, anchor.subject_rgb)) if m.subject_rgb is not None else np.nan for m in measures]
    )
    bg_de = np.array([float(delta_e2000(m.background_rgb, anchor.background_rgb)) for m in measures])
    area = np.array([m.area for m in measures]) / anchor.area
    second = np.array([m.second_area for m in measures]) / anchor.area
    cents = np.stack([m.centroid for m in measures])
    sharp = np.array([m.sharpness for m in measures])
    sharp = sharp / max(float(np.median(sharp[: min(SHARPNESS_REFERENCE_FRAMES, clip_lengths[0])])), 1e-9)
    noise = np.array([m.noise for m in measures]) - anchor.noise
    diffs = np.array([_mean_abs_diff(frames[k], frames[k + 1]) for k in range(len(frames) - 1)])
    jumps = seam_jumps(diffs, clip_lengths, JUMP_WINDOW, JUMP_FLOOR)

    starts = np.concatenate([[0], np.cumsum(clip_lengths)[:-1]]).astype(int)
    clips = []
    for i, (spec, prompt, a, n) in enumerate(zip(specs, prompts, starts, clip_lengths)):
        b = a + n
        lost = (area[a:b] < LOST_AREA_RATIO)
        split = (second[a:b] >= SPLIT_PIECE_RATIO) & ~lost
        present = ~lost
        if lost.mean() >= BAD_FRAME_FRACTION:
            status = "lost"
        elif split.mean() >= BAD_FRAME_FRACTION:
            status = "split"
        else:
            med = float(np.median(area[a:b][present]))
            status = "kept" if AREA_KEPT_RANGE[0] <= med <= AREA_KEPT_RANGE[1] else "resized"
        de = subj_de[a:b][present & ~np.isnan(subj_de[a:b])]
        color = float(np.median(de)) if de.size else None
        background = float(np.median(bg_de[a:b]))
        sharp_ratio = float(np.median(sharp[a:b]))
        noise_increase = float(np.median(noise[a:b]))
        track = np.where(present[:, None], cents[a:b], np.nan)
        motion = _motion_check(spec, track, scale)
        jump = jumps[i]
        checks = {
            "color": None if color is None else color <= SUBJECT_DELTA_E_MAX,
            "background": background <= BACKGROUND_DELTA_E_MAX,
            "area": status == "kept",
            "motion": motion["ok"],
            "sharpness": SHARPNESS_RANGE[0] <= sharp_ratio <= SHARPNESS_RANGE[1]
            and noise_increase <= NOISE_MAX_INCREASE,
            "boundary": None if jump is None else jump <= JUMP_MAX,
        }
        checks = {k: None if v is None else bool(v) for k, v in checks.items()}
        failed = [k for k, v in checks.items() if v is False]
        clips.append(
            {
                "index": i,
                "prompt": prompt,
                "start": int(a),
                "stop": int(b),
                "color_delta_e": _r(color),
                "background_delta_e": _r(background),
                "area_ratio": _r(float(np.median(area[a:b]))),
                "area_status": status,
                "lost_frames": int(lost.sum()),
                "split_frames": int(split.sum()),
                "motion": spec.motion,
                "displacement": motion.get("displacement"),
                "expected_displacement": motion.get("expected"),
                "vertical_range": motion.get("vertical_range"),  # bounces: the hop measured ...
                "expected_rise": motion.get("expected_rise"),  # ... and the one the world would show
                "sharpness_ratio": _r(sharp_ratio),
                "noise_increase": _r(noise_increase),
                "boundary_jump": _r(jump),
                "checks": checks,
                "failed": failed,
                "passed": not failed and checks["area"],
            }
        )
    n_pass = sum(c["passed"] for c in clips)
    return {
        "passed": n_pass == len(clips),
        "clips_passed": n_pass,
        "num_clips": len(clips),
        "pass_rate": n_pass / len(clips),
        "num_frames": int(len(frames)),
        "size": [int(W), int(H)],
        "anchor": {
            "subject_rgb": np.round(anchor.subject_rgb, 1).tolist(),
            "background_rgb": np.round(anchor.background_rgb, 1).tolist(),
            "subject_area_px": anchor.area,
        },
        "thresholds": THRESHOLDS,
        "clips": clips,
        "per_frame": {
            "subject_delta_e": _list(subj_de),
            "background_delta_e": _list(bg_de),
            "area_ratio": _list(area),
            "centroid": [_list(c) for c in cents],
            "sharpness_ratio": _list(sharp),
            "noise_increase": _list(noise),
            "frame_diff": _list(diffs),
        },
    }


def _r(v, nd: int = 4):
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else round(float(v), nd)


def _list(a: np.ndarray) -> list:
    return [None if np.isnan(v) else round(float(v), 4) for v in np.asarray(a, dtype=np.float64).ravel()]


# ----- outputs ------------------------------------------------------------------------------
def plot_panel(ax, x, ys, bad: list, lines, title: str) -> None:
    """One metric vs clip: the series, failed clips as red crosses, thresholds as dashed lines."""
    ax.plot(x, ys, "o-")
    if bad:
        ax.plot(*zip(*bad), "rx", ms=10, mew=2)
    for t in lines:
        ax.axhline(t, color="gray", ls="--", lw=1)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("clip")


def plot_metrics(result: dict, path: str | Path) -> Path:
    """Metrics vs clip index, with pass thresholds, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clips = result["clips"]
    x = [c["index"] for c in clips]

    def series(key):
        return [np.nan if c[key] is None else c[key] for c in clips]

    motion_ok = [np.nan if c["checks"]["motion"] is None else float(c["checks"]["motion"]) for c in clips]
    panels = [
        ("subject ΔE2000 vs anchor", series("color_delta_e"), [SUBJECT_DELTA_E_MAX], "color"),
        ("background ΔE2000 vs anchor", series("background_delta_e"), [BACKGROUND_DELTA_E_MAX], "background"),
        ("subject area / anchor", series("area_ratio"), list(AREA_KEPT_RANGE), "area"),
        ("motion as prompted (1 = yes)", motion_ok, [], "motion"),
        ("sharpness / anchor", series("sharpness_ratio"), list(SHARPNESS_RANGE), "sharpness"),
        ("boundary jump ratio", series("boundary_jump"), [JUMP_MAX], "boundary"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6), constrained_layout=True, sharex=True)
    for ax, (title, ys, lines, check) in zip(axes.ravel(), panels):
        bad = [(c["index"], y) for c, y in zip(clips, ys) if c["checks"][check] is False and not np.isnan(y)]
        plot_panel(ax, x, ys, bad, lines, title)
        ax.set_xlim(-0.5, len(clips) - 0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if check == "motion":
            ax.set_ylim(-0.1, 1.1)
    verdict = "PASS" if result["passed"] else "FAIL"
    fig.suptitle(f"{verdict}: {result['clips_passed']}/{result['num_clips']} clips pass (red x = check failed)")
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _describe(c: dict) -> tuple[str, list[str], list[str]]:
    """Contact-sheet text of a ShapesWorld clip: (second line, verdict, numbers)."""
    verdict = "PASS" if c["passed"] else "FAIL: " + ", ".join(c["failed"] or ["area"])
    numbers = [f"dE {c['color_delta_e']:.1f}" if c["color_delta_e"] is not None else "dE -",
               f"bg {c['background_delta_e']:.1f}"]
    if c["boundary_jump"] is not None:
        numbers.append(f"jump {c['boundary_jump']:.1f}")
    return c["motion"], [verdict], numbers


def contact_sheet(frames: np.ndarray, result: dict, path: str | Path, cell: int = 96, describe=_describe) -> Path:
    """First, middle and last frame of every clip, one row per clip, labelled with its verdict
    (``describe(clip) -> (second line, verdict lines, numbers)``; ShapesWorld's by default)."""
    from PIL import Image, ImageDraw

    clips = result["clips"]
    label_w, pad = 190, 4
    h, w = frames.shape[1:3]
    cw = max(1, round(cell * w / h)) if h else cell
    sheet = Image.new("RGB", (label_w + 3 * (cw + pad), len(clips) * (cell + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, c in enumerate(clips):
        a, b = c["start"], c["stop"]
        y0 = pad + r * (cell + pad)
        for j, k in enumerate((a, (a + b - 1) // 2, b - 1)):
            img = Image.fromarray(frames[k]).resize((cw, cell), Image.NEAREST)
            sheet.paste(img, (label_w + j * (cw + pad), y0))
        second, verdict, numbers = describe(c)
        color = (0, 120, 0) if c["passed"] else (200, 0, 0)
        draw.text((4, y0 + 2), f"clip {c['index']}  frames {a}-{b - 1}", fill=(0, 0, 0))
        draw.text((4, y0 + 16), second, fill=(0, 0, 0))
        lines = [t for v in verdict for t in textwrap.wrap(v, 30, break_on_hyphens=False)]
        for j, text in enumerate(lines[:2]):
            draw.text((4, y0 + 30 + 14 * j), text, fill=color)
        draw.text((4, y0 + 30 + 14 * min(2, len(lines))), "  ".join(numbers), fill=(60, 60, 60))
    path = Path(path)
    sheet.save(path)
    return path


def evaluate(
    video_path,
    prompts: list[str] | None = None,
    clip_lengths: list[int] | None = None,
    out_dir=None,
    report: dict | str | Path | None = None,
) -> dict:
    """Evaluate a video file and write ``eval.json``, ``eval_metrics.png``, ``eval_contact.png``.

    Prompts and clip lengths come from the arguments, else from ``report``, else from the
    engine report beside the video. ``out_dir`` defaults to the video's folder. Returns the
    result dict with an ``outputs`` entry naming the files written.
    """
    frames = read_frames(video_path)
    if prompts is None or clip_lengths is None:
        report = report if report is not None else find_report(video_path)
        if report is None:
            raise ValueError(f"no report beside {video_path}; pass prompts and clip lengths (or --story)")
        prompts, clip_lengths = clips_from_report(report)
    result = evaluate_video(frames, prompts=prompts, clip_lengths=clip_lengths)
    path = Path(video_path)
    out = Path(out_dir) if out_dir is not None else (path if path.is_dir() else path.parent)
    result["video"] = str(path)
    result["outputs"] = write_outputs(frames, result, out, "eval" if path.is_dir() else f"{path.stem}.eval")
    return result


def write_outputs(frames: np.ndarray, result: dict, out_dir, stem: str) -> dict:
    """Write ``STEM.json`` (the result), ``STEM_metrics.png`` and ``STEM_contact.png`` into ``out_dir``.

    Returns the paths written (also stored in the JSON under ``outputs``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    outputs = {
        "json": str(out / f"{stem}.json"),
        "plot": str(plot_metrics(result, out / f"{stem}_metrics.png")),
        "contact_sheet": str(contact_sheet(frames, result, out / f"{stem}_contact.png")),
    }
    Path(outputs["json"]).write_text(json.dumps({**result, "outputs": outputs}, indent=2) + "\n")
    return outputs


def summary_line(result: dict) -> str:
    """One line for a terminal: verdict, clips passed, and the failed checks per clip."""
    bad = [f"clip {c['index']}: {', '.join(c['failed'] or ['area'])}" for c in result["clips"] if not c["passed"]]
    head = f"{'PASS' if result['passed'] else 'FAIL'} {result['clips_passed']}/{result['num_clips']} clips"
    return head + ("" if not bad else " (" + "; ".join(bad) + ")")
