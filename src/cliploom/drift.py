"""Drift metrics for any video made of clips (no prompts, no world, no model download).

Where ``cliploom.evaluate`` scores a ShapesWorld video against what its prompts say, this module
measures what long-video users see go wrong on real footage, from the pixels alone:

- **colour and brightness drift**: the mean CIE Lab colour of each clip against clip 0
  (CIEDE2000 and the change of L*), and of the video's last 15 % of frames against its first 15 %
  (the start-vs-end drift Helios reports);
- **seam flicker**: the frame difference across each clip boundary divided by the in-clip
  difference next to it (the same ratio as the ShapesWorld boundary check);
- **frozen motion**: clips whose motion energy (median in-clip frame difference) collapses below
  a fraction of the first clip's;
- **similarity vs frame gap**: how alike two frames ``g`` apart are, for gaps 1, 2, 4, ..., from
  colour histograms and from SSIM of the luma: a curve that keeps falling with the gap is drift,
  one that flattens is a stable video.

A clip is flagged when a threshold below is crossed; the numbers matter more than the flags.
"""

from __future__ import annotations

import numpy as np

from .shapesworld.color import delta_e2000, srgb_to_lab

# ----- thresholds (documented in docs/evaluate.md) ----------------------------------------------------
COLOR_DRIFT_MAX = 6.0  # ΔE2000 of a clip's mean colour vs clip 0: a cast anyone sees on a whole frame
BRIGHTNESS_DRIFT_MAX = 10.0  # |ΔL*| of a clip's mean vs clip 0
SEAM_JUMP_MAX = 4.0  # boundary difference / in-clip difference (as evaluate.JUMP_MAX)
SEAM_WINDOW = 4  # in-clip differences compared on each side of a boundary
SEAM_FLOOR = 0.5  # in-clip difference floor (mean |Δ| in 0..255): still videos do not divide by ~0
FROZEN_FRACTION = 0.2  # a clip moving less than this share of clip 0's motion energy is frozen
FROZEN_FLOOR = 0.3  # ... unless clip 0 itself hardly moves (mean |Δ| below this)
END_FRACTION = 0.15  # start vs end: the first and last 15 % of frames
SIDE = 64  # frames are measured at most this many pixels wide (enough for colour, motion, SSIM)

THRESHOLDS = {"color_drift_max": COLOR_DRIFT_MAX, "brightness_drift_max": BRIGHTNESS_DRIFT_MAX,
              "seam_jump_max": SEAM_JUMP_MAX, "seam_window": SEAM_WINDOW, "seam_floor": SEAM_FLOOR,
              "frozen_fraction": FROZEN_FRACTION, "frozen_floor": FROZEN_FLOOR, "end_fraction": END_FRACTION}


def _small(frames: np.ndarray) -> np.ndarray:
    """Frames box-downscaled to at most ``SIDE`` pixels wide, float64 0..255."""
    f = frames.astype(np.float64)
    step = max(1, int(np.ceil(f.shape[2] / SIDE)))
    if step == 1:
        return f
    h, w = (f.shape[1] // step) * step, (f.shape[2] // step) * step
    f = f[:, :h, :w]
    return f.reshape(f.shape[0], h // step, step, w // step, step, 3).mean(axis=(2, 4))


def seam_jumps(diffs: np.ndarray, clip_lengths: list[int], window: int = SEAM_WINDOW,
               floor: float = SEAM_FLOOR) -> list[float | None]:
    """Per clip, the difference across its starting boundary over the in-clip differences next to
    it (the larger median of ``window`` frame pairs before and after); None for clip 0.
    ``diffs[k]``: the mean absolute difference between frames k and k + 1."""
    starts = np.concatenate([[0], np.cumsum(clip_lengths)[:-1]]).astype(int)
    out: list[float | None] = [None]
    for i in range(1, len(clip_lengths)):
        a, b = starts[i], starts[i] + clip_lengths[i]
        before = diffs[max(starts[i - 1], a - 1 - window): a - 1]
        after = diffs[a: min(b - 1, a + window)]
        ref = max([float(np.median(w)) for w in (before, after) if w.size] + [floor])
        out.append(float(diffs[a - 1] / ref))
    return out


def _histogram(frame: np.ndarray, bins: int = 8) -> np.ndarray:
    q = np.clip((frame / 256.0 * bins).astype(int), 0, bins - 1)
    idx = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    h = np.bincount(idx.ravel(), minlength=bins ** 3).astype(np.float64)
    return h / h.sum()


def _ssim(a: np.ndarray, b: np.ndarray, k: int = 7) -> float:
    """Mean SSIM of two luma images (0..255) over k x k box windows."""
    def box(x):
        c = np.cumsum(np.cumsum(np.pad(x, ((1, 0), (1, 0))), axis=0), axis=1)
        return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)

    if min(a.shape) < k:
        k = min(a.shape)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ma, mb = box(a), box(b)
    va, vb, cov = box(a * a) - ma ** 2, box(b * b) - mb ** 2, box(a * b) - ma * mb
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))
    return float(s.mean())


def similarity_curve(small: np.ndarray, max_pairs: int = 48) -> dict:
    """Mean histogram intersection and SSIM of frame pairs ``g`` apart, for g = 1, 2, 4, ..."""
    n = len(small)
    luma = small @ np.array([0.299, 0.587, 0.114])
    hists = np.stack([_histogram(f) for f in small])
    gaps, hist_sim, ssim = [], [], []
    g = 1
    while g < n:
        starts = np.linspace(0, n - 1 - g, num=min(max_pairs, n - g)).round().astype(int)
        gaps.append(g)
        hist_sim.append(round(float(np.mean([np.minimum(hists[t], hists[t + g]).sum() for t in starts])), 4))
        ssim.append(round(float(np.mean([_ssim(luma[t], luma[t + g]) for t in starts])), 4))
        g *= 2
    return {"gaps": gaps, "histogram": hist_sim, "ssim": ssim}


def drift_metrics(frames: np.ndarray, clip_lengths: list[int], prompts: list[str] | None = None) -> dict:
    """Per-clip and whole-video drift of ``frames`` (uint8 ``[N, H, W, 3]``) cut into clips of
    ``clip_lengths`` frames. JSON-serialisable; ``passed`` when no clip is flagged."""
    clip_lengths = [int(n) for n in clip_lengths]
    if not clip_lengths or any(n < 1 for n in clip_lengths):
        raise ValueError(f"clip lengths must be >= 1 frame, got {clip_lengths[:10]}")
    if sum(clip_lengths) != len(frames):
        raise ValueError(f"the clips add up to {sum(clip_lengths)} frames but the video has {len(frames)}")
    small = _small(frames)
    lab = srgb_to_lab(small.mean(axis=(1, 2)))  # mean colour of every frame, Lab
    mean_rgb = small.mean(axis=(1, 2))
    diffs = np.abs(np.diff(small, axis=0)).mean(axis=(1, 2, 3))
    jumps = seam_jumps(diffs, clip_lengths)
    starts = np.concatenate([[0], np.cumsum(clip_lengths)[:-1]]).astype(int)

    def energy(a: int, b: int) -> float:
        d = diffs[a: b - 1]
        return float(np.median(d)) if d.size else 0.0

    first_rgb = mean_rgb[starts[0]: starts[0] + clip_lengths[0]].mean(axis=0)
    first_L = lab[: clip_lengths[0], 0].mean()
    first_energy = energy(0, clip_lengths[0])
    clips = []
    for i, (a, n) in enumerate(zip(starts, clip_lengths)):
        b = a + n
        rgb = mean_rgb[a:b].mean(axis=0)
        de = float(delta_e2000(rgb, first_rgb))
        dl = float(lab[a:b, 0].mean() - first_L)
        e = energy(a, b)
        frozen = i > 0 and n > 2 and first_energy >= FROZEN_FLOOR and e < FROZEN_FRACTION * first_energy
        flags = [name for name, bad in (
            ("color", de > COLOR_DRIFT_MAX), ("brightness", abs(dl) > BRIGHTNESS_DRIFT_MAX),
            ("seam", jumps[i] is not None and jumps[i] > SEAM_JUMP_MAX), ("frozen", frozen)) if bad]
        clips.append({
            "index": i, "start": int(a), "stop": int(b), "prompt": prompts[i] if prompts else None,
            "color_delta_e_vs_first": round(de, 3), "brightness_change": round(dl, 3),
            "motion_energy": round(e, 4), "motion_vs_first": round(e / first_energy, 3) if first_energy > 0 else None,
            "seam_jump": None if jumps[i] is None else round(jumps[i], 3), "frozen": bool(frozen),
            "flags": flags, "passed": not flags,
        })
    k = max(1, int(round(END_FRACTION * len(frames))))
    start_rgb, end_rgb = mean_rgb[:k].mean(axis=0), mean_rgb[-k:].mean(axis=0)
    start_end = {
        "frames": k,
        "color_delta_e": round(float(delta_e2000(end_rgb, start_rgb)), 3),
        "brightness_change": round(float(lab[-k:, 0].mean() - lab[:k, 0].mean()), 3),
        "motion_energy_start": round(float(np.median(diffs[: max(1, k - 1)])), 4) if len(diffs) else 0.0,
        "motion_energy_end": round(float(np.median(diffs[-max(1, k - 1):])), 4) if len(diffs) else 0.0,
    }
    passed = sum(c["passed"] for c in clips)
    return {"metrics": "generic", "frames": int(len(frames)), "num_clips": len(clips), "clips": clips,
            "start_end": start_end, "similarity": similarity_curve(small), "thresholds": THRESHOLDS,
            "clips_passed": passed, "passed": passed == len(clips)}


def plot_drift(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .evaluate import plot_panel

    clips = result["clips"]
    x = [c["index"] for c in clips]
    panels = [
        ("mean colour ΔE2000 vs clip 0", [c["color_delta_e_vs_first"] for c in clips], [COLOR_DRIFT_MAX], "color"),
        ("brightness ΔL* vs clip 0", [c["brightness_change"] for c in clips], [-BRIGHTNESS_DRIFT_MAX, BRIGHTNESS_DRIFT_MAX], "brightness"),
        ("seam jump ratio", [np.nan if c["seam_jump"] is None else c["seam_jump"] for c in clips], [SEAM_JUMP_MAX], "seam"),
        ("motion energy / clip 0", [np.nan if c["motion_vs_first"] is None else c["motion_vs_first"] for c in clips],
         [FROZEN_FRACTION], "frozen"),
    ]
    fig, axes = plt.subplots(1, 5, figsize=(17, 3.4), constrained_layout=True)
    for ax, (title, ys, lines, flag) in zip(axes, panels):
        plot_panel(ax, x, ys, [(c["index"], y) for c, y in zip(clips, ys) if flag in c["flags"]], lines, title)
        ax.grid(alpha=0.3)
    sim = result["similarity"]
    axes[4].semilogx(sim["gaps"], sim["histogram"], "o-", label="colour histogram")
    axes[4].semilogx(sim["gaps"], sim["ssim"], "s-", label="SSIM (luma)")
    axes[4].set_title("similarity vs frame gap", fontsize=10)
    axes[4].set_xlabel("gap (frames)")
    axes[4].legend(fontsize=8)
    axes[4].grid(alpha=0.3)
    se = result["start_end"]
    fig.suptitle(f"{result['clips_passed']}/{result['num_clips']} clips unflagged; start vs end: ΔE {se['color_delta_e']:.1f}, "
                 f"ΔL* {se['brightness_change']:+.1f}")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def describe_clip(c: dict) -> tuple[str, list[str], list[str]]:
    """Contact-sheet text of a generic clip: (second line, verdict, numbers)."""
    verdict = "ok" if c["passed"] else "FLAG: " + ", ".join(c["flags"])
    numbers = [f"dE {c['color_delta_e_vs_first']:.1f}", f"dL {c['brightness_change']:+.1f}",
               f"motion {c['motion_energy']:.1f}"]
    if c["seam_jump"] is not None:
        numbers.append(f"seam {c['seam_jump']:.1f}")
    return (c["prompt"] or "")[:30], [verdict], numbers
