"""ShapesWorld scenes: trajectories, per-frame ground truth, rendering and random sampling.

All geometry is defined on a reference 32x32 canvas (``REF`` units) and scaled to the
requested frame size, so a scene looks the same at any resolution. A :class:`Sequence` is one
subject on one background whose motion may change at segment boundaries; a single clip is a
sequence with one segment. Everything is deterministic: the same seed gives the same video.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import render
from .vocab import (
    BACKGROUND_COLORS,
    DISTRACTOR_COLOR,
    MOTIONS,
    SHAPES,
    SIZES,
    STRIPE_LIGHTEN,
    SUBJECT_COLORS,
    PromptSpec,
    parse_prompt,
)

REF = 32.0  # reference canvas size; every length below is in reference pixels
FPS = 16
CLIP_FRAMES = 33  # default clip length of sampled clips (the built-in model itself makes 17-frame clips)
SPEED = 0.4  # px per frame for moves left/right/up/down (12.8 px over a 33-frame clip)
RADIUS = {"small": 4.0, "big": 6.0}  # circle radius / square half-extent; triangles x1.3
MARGIN = 1.0  # the subject's outline stays this far inside the frame
BOUNCE_HEIGHT = 5.0  # hop height; the subject rests on its start height between hops
BOUNCE_PERIOD = 16  # frames per hop (one per second at 16 fps)
STRIPE_PERIOD = 8.0
DISTRACTOR_HALF = 1.5  # the gray block is 3x3 reference px
_VELOCITY = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


def motion_offset(motion: str, t) -> np.ndarray:
    """Offset ``[..., 2]`` (x, y, reference px) of the subject ``t`` frames into a motion."""
    t = np.asarray(t, dtype=np.float64)
    if motion in _VELOCITY:
        vx, vy = _VELOCITY[motion]
        return np.stack([vx * SPEED * t, vy * SPEED * t], axis=-1)
    if motion == "still":
        return np.zeros(t.shape + (2,))
    if motion == "bounce":
        hop = -BOUNCE_HEIGHT * np.abs(np.sin(math.pi * t / BOUNCE_PERIOD))
        return np.stack([np.zeros_like(t), hop], axis=-1)
    raise ValueError(f"unknown motion {motion!r}; valid: {', '.join(MOTIONS)}")


def bounds(spec: PromptSpec) -> tuple[float, float]:
    """The range [lo, hi] (reference px, both axes) the subject's centre may take."""
    ext = render.shape_extent(spec.shape, RADIUS[spec.size])
    return ext + MARGIN, REF - ext - MARGIN


def start_range(spec: PromptSpec, motion: str, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis [low, high] of start centres from which ``motion`` stays in frame for ``frames``.

    The end position checked is the one at ``frames`` (where a following segment would start).
    """
    lo, hi = bounds(spec)
    low, high = np.array([lo, lo]), np.array([hi, hi])
    if motion in _VELOCITY:
        travel = np.array(_VELOCITY[motion]) * SPEED * frames
        low = np.maximum(low, low - travel)
        high = np.minimum(high, high - travel)
    elif motion == "bounce":
        low[1] = lo + BOUNCE_HEIGHT
    return low, high


def room(motion: str, pos, lo: float, hi: float) -> float:
    """Reference px a directed ``motion`` can travel from ``pos`` before the subject meets the edge."""
    v = np.array(_VELOCITY[motion])
    return float(np.dot(np.abs(v), np.where(v > 0, hi - np.asarray(pos), np.asarray(pos) - lo)))


def feasible(spec: PromptSpec, motion: str, frames: int, start) -> bool:
    low, high = start_range(spec, motion, frames)
    start = np.asarray(start, dtype=np.float64)
    return bool(np.all(start >= low - 1e-9) and np.all(start <= high + 1e-9))


@dataclass(frozen=True)
class Segment:
    """Frames ``[start, stop)`` of a sequence, all following one motion prompt."""

    start: int
    stop: int
    motion: str
    prompt: str

    @property
    def frames(self) -> int:
        return self.stop - self.start


@dataclass
class Sequence:
    """One subject on one background; the motion changes at segment boundaries.

    ``appearance`` fixes colour, shape, size and background (its motion is that of segment 0);
    ``start`` is the subject centre at frame 0 and ``distractor`` the gray block's centre, both
    in reference px (``None``: no block). ``size`` is the rendered frame size in pixels. ``track``
    (``[F, 2]`` reference px), when given, is the subject's centre per frame instead of the one the
    motions give (a path measured elsewhere, e.g. on generated frames).
    """

    appearance: PromptSpec
    motions: list[str]
    lengths: list[int]
    start: tuple[float, float]
    distractor: tuple[float, float] | None = None
    size: int = 32
    track: np.ndarray | None = field(default=None, repr=False, compare=False)
    _centers: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if len(self.motions) != len(self.lengths) or not self.motions:
            raise ValueError("a Sequence needs one length per motion and at least one segment")
        if any(n < 1 for n in self.lengths):
            raise ValueError(f"segment lengths must be >= 1 frame, got {self.lengths}")
        if self.size < 8:
            raise ValueError(f"frame size {self.size} is too small; use 8 px or more")
        for m in self.motions:
            if m not in MOTIONS:
                raise ValueError(f"unknown motion {m!r}; valid: {', '.join(MOTIONS)}")
        if self.track is not None:
            self.track = np.asarray(self.track, dtype=np.float64)
            if self.track.shape != (self.num_frames, 2):
                raise ValueError(f"track must hold one (x, y) per frame, shape ({self.num_frames}, 2); "
                                 f"got {self.track.shape}")
            self._centers = self.track
        if self.distractor is None and self.appearance.distractor:
            raise ValueError("the prompt asks for a gray block but the Sequence has no distractor position")

    # ----- structure -------------------------------------------------------------------------
    @property
    def num_frames(self) -> int:
        return int(sum(self.lengths))

    @property
    def scale(self) -> float:
        return self.size / REF

    @property
    def segments(self) -> list[Segment]:
        out, a = [], 0
        for m, n in zip(self.motions, self.lengths):
            out.append(Segment(a, a + n, m, self.appearance.with_motion(m).prompt))
            a += n
        return out

    @property
    def prompts(self) -> list[str]:
        """One prompt per segment (the per-clip prompt stream)."""
        return [s.prompt for s in self.segments]

    # ----- ground truth ----------------------------------------------------------------------
    def centers_ref(self) -> np.ndarray:
        """Subject centre per frame ``[F, 2]`` (x, y) in reference px."""
        if self._centers is None:
            lo, hi = bounds(self.appearance)
            pos = np.asarray(self.start, dtype=np.float64)
            parts = []
            for m, n in zip(self.motions, self.lengths):
                parts.append(pos + motion_offset(m, np.arange(n)))
                pos = pos + motion_offset(m, n)
                pos = np.clip(pos, lo, hi)
            self._centers = np.clip(np.concatenate(parts, axis=0), lo, hi)
        return self._centers

    def ground_truth(self) -> dict:
        """Per-frame truth at the rendered size: centres, size, colours, distractor, motion."""
        F = self.num_frames
        s = self.scale
        seg_index = np.concatenate([np.full(n, i) for i, n in enumerate(self.lengths)])
        gt = {
            "center": self.centers_ref() * s,
            "radius": np.full(F, RADIUS[self.appearance.size] * s),
            "extent": np.full(F, render.shape_extent(self.appearance.shape, RADIUS[self.appearance.size]) * s),
            "color": np.tile(np.array(SUBJECT_COLORS[self.appearance.color], dtype=np.uint8), (F, 1)),
            "background": np.tile(np.array(BACKGROUND_COLORS[self.appearance.background], dtype=np.uint8), (F, 1)),
            "distractor": (
                np.tile(np.array(self.distractor) * s, (F, 1)) if self.distractor is not None else np.full((F, 2), np.nan)
            ),
            "segment": seg_index,
            "motion": [self.motions[i] for i in seg_index],
        }
        return gt

    # ----- rendering -------------------------------------------------------------------------
    def background_image(self) -> np.ndarray:
        """The frame without its subject, float32 ``[H, W, 3]`` in 0..255."""
        H = W = self.size
        base = np.array(BACKGROUND_COLORS[self.appearance.background], dtype=np.float32)
        img = np.broadcast_to(base, (H, W, 3)).astype(np.float32)
        if self.appearance.striped:
            light = base * (1 - STRIPE_LIGHTEN) + 255.0 * STRIPE_LIGHTEN
            img = render.blend(img, light, render.stripes_coverage(H, W, STRIPE_PERIOD * self.scale))
        if self.distractor is not None:
            dx, dy = np.array(self.distractor) * self.scale
            cov = render.coverage("square", dx, dy, DISTRACTOR_HALF * self.scale, H, W)
            img = render.blend(img, DISTRACTOR_COLOR, cov)
        return img

    def subject_coverage(self, k: int) -> np.ndarray:
        cx, cy = self.centers_ref()[k] * self.scale
        r = RADIUS[self.appearance.size] * self.scale
        return render.coverage(self.appearance.shape, cx, cy, r, self.size, self.size)

    def frames(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rendered frames ``[start, stop)`` as uint8 RGB ``[F, H, W, 3]``."""
        stop = self.num_frames if stop is None else stop
        bg = self.background_image()
        color = SUBJECT_COLORS[self.appearance.color]
        out = np.empty((max(0, stop - start), self.size, self.size, 3), dtype=np.uint8)
        for i, k in enumerate(range(start, stop)):
            out[i] = render.to_uint8(render.blend(bg, color, self.subject_coverage(k)))
        return out


# ----- building scenes ---------------------------------------------------------------------
def canonical_start(spec: PromptSpec, frames: int = CLIP_FRAMES) -> tuple[float, float]:
    """A start centre that keeps a ``frames``-long clip of ``spec.motion`` centred in frame."""
    mid = REF / 2.0
    low, high = start_range(spec, spec.motion, frames)
    path_mid = motion_offset(spec.motion, frames) / 2.0
    if spec.motion == "bounce":
        path_mid = np.array([0.0, -BOUNCE_HEIGHT / 2.0])
    start = np.clip(np.array([mid, mid]) - path_mid, np.minimum(low, high), np.maximum(low, high))
    return float(start[0]), float(start[1])


CANONICAL_DISTRACTOR = (4.5, 27.5)


def scene_from_prompt(
    prompt: str | PromptSpec,
    frames: int = CLIP_FRAMES,
    size: int = 32,
    seed: int | None = None,
) -> Sequence:
    """A one-clip sequence showing ``prompt``.

    ``seed=None`` places the subject canonically (its path centred in frame, the gray block in
    the lower-left corner); a seed draws a random feasible start and block position instead.
    """
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    if seed is None:
        start = canonical_start(spec, frames)
        distractor = CANONICAL_DISTRACTOR if spec.distractor else None
    else:
        rng = np.random.default_rng(seed)
        start = _random_start(rng, spec, spec.motion, frames)
        distractor = _random_distractor(rng, start) if spec.distractor else None
    return Sequence(spec, [spec.motion], [frames], start, distractor, size)


def render_reference(prompt: str, size: int = 32, seed: int | None = None):
    """The first frame of a clip for ``prompt`` as a PIL image (``cliploom shapesworld render``)."""
    from PIL import Image

    return Image.fromarray(scene_from_prompt(prompt, size=size, seed=seed).frames(0, 1)[0])


def _random_start(rng: np.random.Generator, spec: PromptSpec, motion: str, frames: int) -> tuple[float, float]:
    low, high = start_range(spec, motion, frames)
    high = np.maximum(low, high)  # a clip longer than the frame allows: start at the far side
    xy = rng.uniform(low, high)
    return float(xy[0]), float(xy[1])


def _random_distractor(rng: np.random.Generator, subject_start) -> tuple[float, float]:
    lo, hi = DISTRACTOR_HALF + MARGIN, REF - DISTRACTOR_HALF - MARGIN
    for _ in range(100):
        xy = rng.uniform(lo, hi, size=2)
        if np.linalg.norm(xy - np.asarray(subject_start)) > 10.0:
            break
    return float(xy[0]), float(xy[1])


def random_appearance(rng: np.random.Generator, motion: str = "still") -> PromptSpec:
    """A random subject and background (striped half the time, a gray block a third)."""
    return PromptSpec(
        color=str(rng.choice(list(SUBJECT_COLORS))),
        shape=str(rng.choice(SHAPES)),
        motion=motion,
        background=str(rng.choice(list(BACKGROUND_COLORS))),
        size=str(rng.choice(SIZES)),
        striped=bool(rng.random() < 0.5),
        distractor=bool(rng.random() < 1.0 / 3.0),
    )


def sample_clip(seed: int, frames: int = CLIP_FRAMES, size: int = 32) -> Sequence:
    """A random single-prompt clip: random appearance, motion and feasible start."""
    rng = np.random.default_rng(seed)
    spec = random_appearance(rng, motion=str(rng.choice(list(MOTIONS))))
    start = _random_start(rng, spec, spec.motion, frames)
    distractor = _random_distractor(rng, start) if spec.distractor else None
    return Sequence(spec, [spec.motion], [frames], start, distractor, size)


def sample_sequence(
    seed: int,
    num_segments: int,
    segment_frames: int | list[int] = CLIP_FRAMES,
    size: int = 32,
    still_weight: float = 0.5,
    wall_prob: float = 0.0,
    wall_move: str = "any",
) -> Sequence:
    """A long sequence whose motion is re-chosen at every segment boundary.

    Each segment's motion is drawn among those that keep the subject in frame for the whole
    segment (``stays still`` always qualifies, with weight ``still_weight``), so the subject moves
    as prompted for the whole segment. With ``wall_prob`` > 0, a later segment instead takes, with
    that chance, a move that runs into the frame edge within the segment (where there is one): the
    subject moves until it reaches the edge and stays there, the world's rule (and the evaluator's)
    for a prompt that asks for more room than is left. ``segment_frames`` is one length for all or
    one per segment. ``wall_move`` picks that move: ``"any"`` of those that reach an edge, or
    ``"nearest"``, the one towards the nearest edge (the subject gets there soonest, and a second
    such segment finds it already against the edge). ``wall_prob`` = 0 draws exactly the sequences
    it always drew.
    """
    if wall_move not in ("any", "nearest"):
        raise ValueError(f"wall_move {wall_move!r} is not 'any' or 'nearest'")
    lengths = [segment_frames] * num_segments if isinstance(segment_frames, int) else list(segment_frames)
    if len(lengths) != num_segments:
        raise ValueError(f"got {len(lengths)} segment lengths for {num_segments} segments; give one per segment")
    rng = np.random.default_rng(seed)
    spec = random_appearance(rng)
    first = str(rng.choice([m for m in MOTIONS if m != "still"]))
    start = _random_start(rng, spec, first, lengths[0])
    motions, pos = [], np.array(start)
    lo, hi = bounds(spec)
    for n in lengths:
        walls = [m for m in _VELOCITY if not feasible(spec, m, n, pos)] if motions and wall_prob > 0 else []
        if not motions:
            m = first
        elif walls and rng.random() < wall_prob:
            if wall_move == "nearest":
                m = min(walls, key=lambda w: room(w, pos, lo, hi))
            else:
                m = str(rng.choice(walls))
        else:
            options = [m for m in MOTIONS if feasible(spec, m, n, pos)]
            weights = np.array([still_weight if m == "still" else 1.0 for m in options])
            m = str(rng.choice(options, p=weights / weights.sum()))
        motions.append(m)
        pos = pos + motion_offset(m, n)
        if wall_prob > 0:
            pos = np.clip(pos, lo, hi)  # as centers_ref: stopped at the edge
    distractor = _random_distractor(rng, start) if spec.distractor else None
    return Sequence(spec.with_motion(first), motions, lengths, start, distractor, size)
