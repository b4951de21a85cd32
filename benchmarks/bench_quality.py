"""Quality benchmark: drift over 20 clips on a 14-story ShapesWorld dev set, by mode and SVI LoRA.

    python benchmarks/bench_quality.py [--model DIR] [--stories 14] [--clips 20]
        [--modes pro,svi2,chain] [--variant NAME=LORA.safetensors|none|default ...] [--sheets DIR]

Every dev story is one subject (shape, colour, size) on one background, whose motion prompt
changes at every clip boundary; its reference frame is drawn by ``render_reference``. Each
story is generated in every mode — ``pro`` (latent motion, SVI 2.0 Pro), ``svi2`` (pixel motion,
SVI 2.0: the last 5 frames plus the reference as padding) and ``chain`` (naive chaining: the
previous clip's last frame as a plain I2V image, no anchor, no SVI LoRA; the other modes use
the model's own SVI LoRA when it has one) — and, for the error-recycling ablation (issue 5),
with each ``--variant`` in latent mode (``NAME=LORA.safetensors``: that LoRA alone;
``NAME=none``: no LoRA, the base model; ``NAME=default``: the model's own SVI LoRA; the first
variant is the baseline the others are compared with). Every clip is scored by
``cliploom.evaluate`` (thresholds in docs/shapesworld.md).

Writes ``benchmarks/results/quality.json`` (per-clip metrics of every run, pass rates, curves
per clip index), ``docs/img/quality_modes.png`` / ``quality_ablation.png`` and the section
between ``<!-- quality:start -->`` and ``<!-- quality:end -->`` in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEV_SEED = 20260  # the dev set's seed: changing it changes every story
DEFAULT_MODES = ("pro", "svi2", "chain", "naive", "pro-raw")
CURVE_METRICS = ("color_delta_e", "background_delta_e", "boundary_jump", "sharpness_ratio", "area_ratio")
CHECKS = ("color", "background", "area", "motion", "sharpness", "boundary")
MODE_NOTES = {
    "pro": "latent motion (SVI 2.0 Pro: anchor latent + the previous clip's last K = 1 latent)",
    "svi2": "pixel motion (SVI 2.0 preset: the previous clip's last 5 frames, reference-image padding)",
    "film": "pixel motion (SVI 1.0 Film preset: the last 5 frames, zero padding)",
    "shot": "pixel motion (SVI 1.0 Shot preset: the last frame, reference-image padding)",
    "tom": "pixel motion (SVI 1.0 Tom preset: the last frame, zero padding)",
    "chain": "chaining (the previous clip's last frame as a plain I2V image, no SVI LoRA; each clip colour matched "
             "to the reference image, the model's default)",
    "naive": "naive chaining as issue 12 defines it (`chain` with colour matching off: after clip 0 nothing of "
             "the reference image is used)",
    "pro-raw": "`pro` with colour matching off (what the SVI conditioning does on its own)",
}
# runs that are a mode with story keys of their own (``--modes`` takes their names too)
PRESETS = {"naive": ("chain", {"color_match": "none"}), "pro-raw": ("pro", {"color_match": "none"})}
LAST_WINDOW = 5  # "late" numbers also averaged over the last this-many clips (steadier than one clip)


# ----- the dev set --------------------------------------------------------------------------------
@dataclass
class DevStory:
    """One dev story: a subject, its planned motions (one per clip) and where it starts."""

    index: int
    seed: int
    prompts: list[str]
    motions: list[str]
    start: tuple[float, float]  # subject centre at frame 0, reference px (from render_reference's placement)
    distractor: tuple[float, float] | None
    planned_lengths: list[int]  # frames per clip the plan assumed (latent mode's kept frames)

    def story_seed(self, sample_seed: int = 0) -> int:
        """The story seed of one sampling seed: ``sample_seed`` moves the sampling noise only (the story,
        its reference and prompts stay); every dev-set script draws it here."""
        return self.seed + 1000 * sample_seed

    def reference(self, size: int):
        """The story's first frame (PIL), exactly as ``cliploom shapesworld render PROMPT --seed SEED`` draws it."""
        from cliploom.shapesworld import render_reference

        return render_reference(self.prompts[0], size=size, seed=self.seed)

    def ground_truth(self, lengths: list[int] | None = None, size: int = 32):
        """The world's own video of the story (a :class:`~cliploom.shapesworld.Sequence`); with ``lengths``,
        of its first ``len(lengths)`` clips at those lengths."""
        from cliploom.shapesworld import Sequence, parse_prompt

        lengths = list(lengths or self.planned_lengths)
        return Sequence(parse_prompt(self.prompts[0]), self.motions[: len(lengths)], lengths, self.start,
                        self.distractor, size)


def appearance(i: int):
    """Story ``i``'s subject and background: cycles that cover every colour, shape, background and size."""
    from cliploom.shapesworld.vocab import BACKGROUND_COLORS, SHAPES, SIZES, SUBJECT_COLORS, PromptSpec

    colors, backgrounds = list(SUBJECT_COLORS), list(BACKGROUND_COLORS)
    return PromptSpec(
        color=colors[i % len(colors)],
        shape=SHAPES[i % len(SHAPES)],
        motion="still",  # replaced by the plan
        background=backgrounds[(i // 2) % len(backgrounds)],
        size=SIZES[(i + i // 7) % len(SIZES)],
        striped=i % 4 >= 2,
        distractor=i % 5 == 3,
    )


def plan_motions(spec, first: str, start, lengths: list[int], rng: np.random.Generator) -> list[str]:
    """One motion per clip, never the previous clip's, each kept in frame by the world's own rules.

    A motion is *feasible* when the subject, moving it for the clip's frames, stays in frame. If
    none but the previous motion is, the directed move with the most room is taken: the world
    then stops the subject at the frame edge, and the evaluator expects exactly that.
    """
    from cliploom.shapesworld import world
    from cliploom.shapesworld.vocab import MOTIONS

    lo, hi = world.bounds(spec)
    pos = np.asarray(start, dtype=np.float64)
    motions: list[str] = []
    for n in lengths:
        if not motions:
            m = first
        else:
            options = [m for m in MOTIONS if m != motions[-1] and world.feasible(spec, m, n, pos)]
            if options:
                m = str(rng.choice(options))
            else:
                room = {m: world.room(m, pos, lo, hi) for m in world._VELOCITY if m != motions[-1]}
                m = max(room, key=room.get)
        motions.append(m)
        pos = np.clip(pos + world.motion_offset(m, n), lo, hi)
    return motions


def dev_set(stories: int = 14, clips: int = 20, frames: int = 33, motion_latents: int = 1) -> list[DevStory]:
    """The dev set for clips of ``frames`` frames: deterministic, the same for every mode and LoRA.

    Motions are planned on latent mode's timeline (clip 0 keeps ``frames``, later clips
    ``frames - 1 - 4K``); the subject's start is the random feasible placement that
    ``render_reference(prompt, seed=story seed)`` draws.
    """
    from cliploom.shapesworld import scene_from_prompt
    from cliploom.shapesworld.vocab import MOTIONS

    lengths = [frames] + [frames - 1 - 4 * motion_latents] * (clips - 1)
    out = []
    for i in range(stories):
        rng = np.random.default_rng([DEV_SEED, i])
        spec = appearance(i)
        first = str(rng.choice([m for m in MOTIONS if m != "still"]))
        seed = DEV_SEED + i
        scene = scene_from_prompt(spec.with_motion(first), seed=seed)  # what render_reference draws
        motions = plan_motions(spec, first, scene.start, lengths, rng)
        prompts = [spec.with_motion(m).prompt for m in motions]
        out.append(DevStory(i, seed, prompts, motions, scene.start, scene.distractor, lengths))
    return out


# ----- running --------------------------------------------------------------------------------------
def load_engine(model: str = "builtin"):
    """The engine the quick dev-set scripts run (quality_sweep, memory_cost): ``CLIPLOOM_THREADS``
    CPU threads (2, the CI machine's cores, unless set), libraries' progress chatter off."""
    import torch

    from cliploom.cli import _quiet_libraries
    from cliploom.engine import Engine

    torch.set_num_threads(int(os.environ.get("CLIPLOOM_THREADS", "2")))
    _quiet_libraries()
    return Engine.load(model)


def write_references(devs: list["DevStory"], size: int, folder: Path) -> list[Path]:
    """Each dev story's reference frame as ``folder/ref_NN.png``."""
    paths = []
    for d in devs:
        paths.append(Path(folder) / f"ref_{d.index:02d}.png")
        d.reference(size).save(paths[-1])
    return paths


@dataclass
class Run:
    """One way of generating the dev set: a motion mode and the LoRAs applied.

    ``svi_lora``: apply the model's own SVI LoRA (``svi_lora`` in its cliploom.json, applied by
    default in production); ``lora``: one more LoRA file.
    """

    name: str
    mode: str
    lora: Path | None = None
    kind: str = "mode"  # "mode" or "variant"
    svi_lora: bool = True
    route: str = "svi"  # cliploom.routes
    route_options: dict = field(default_factory=dict)
    story: dict = field(default_factory=dict)  # story keys of this run's own (over the model's defaults)


def mode_run(mode: str) -> Run:
    """A mode as users run it (with the model's own SVI LoRA), except chaining: plain I2V, no SVI; or a
    preset (``naive``, ``pro-raw``: a mode with story keys of its own, ``PRESETS``)."""
    name, (mode, story) = mode, PRESETS.get(mode, (mode, {}))
    return Run(name, mode, None, "mode", svi_lora=mode != "chain", story=dict(story))


def parse_variant(text: str) -> Run:
    """``NAME=LORA.safetensors`` (that LoRA alone), ``NAME=none`` (no LoRA: the base model) or
    ``NAME=default`` (the model's own SVI LoRA); all in latent mode. ``@ROUTE[:KEY=VALUE...]`` after
    the LoRA runs it on another route (docs/routes.md): ``df=runs/df/lora_svi.safetensors@df:addnoise=20``."""
    route, options = "svi", {}
    if "@" in text:
        from cliploom.routes import parse_option

        text, spec = text.rsplit("@", 1)
        route, *pairs = spec.split(":")
        options = dict(parse_option(p) for p in pairs)
    run = _parse_lora_variant(text)
    run.route, run.route_options = route, options
    return run


def _parse_lora_variant(text: str) -> Run:
    if "=" not in text:
        raise SystemExit(f"error: --variant {text!r} must be NAME=LORA.safetensors (or NAME=none, NAME=default); "
                         "e.g. --variant ER=out/svi_er.safetensors")
    name, path = (s.strip() for s in text.split("=", 1))
    if not name:
        raise SystemExit(f"error: --variant {text!r} has no name; write NAME=LORA.safetensors")
    if path.lower() in ("none", ""):
        return Run(name, "pro", None, "variant", svi_lora=False)
    if path.lower() == "default":
        return Run(name, "pro", None, "variant", svi_lora=True)
    lora = Path(path).expanduser()
    if lora.suffix != ".safetensors" or not lora.is_file():
        raise SystemExit(f"error: --variant {name}: {lora} is not a .safetensors file; pass the LoRA the trainer exported")
    return Run(name, "pro", lora, "variant", svi_lora=False)


def generate_story(engine, dev: DevStory, run: Run, reference: Path, overrides: dict, sample_seed: int = 0):
    """Generate one dev story in one run; returns (frames uint8 [N, H, W, 3], prompts, frames per clip).

    ``sample_seed`` moves the sampling noise only (the story, its reference and prompts stay)."""
    from cliploom.story import ClipSpec, LoraSpec, make_story

    story = make_story(
        clips=[ClipSpec(p) for p in dev.prompts],
        reference=reference,
        mode=run.mode,
        seed=dev.story_seed(sample_seed),
        loras=[LoraSpec(run.lora)] if run.lora else [],
        svi_lora=run.svi_lora,
        **({"route": run.route, "route_options": run.route_options} if run.route != "svi" else {}),
        **{**run.story, **overrides},
    )
    clips = list(engine.generate(story, progress=False))
    frames = np.concatenate([c.frames.numpy() for c in clips])
    return frames, [c.prompt for c in clips], [int(c.frames.shape[0]) for c in clips]


CLIP_KEYS = ("index", "prompt", "color_delta_e", "background_delta_e", "area_ratio", "area_status", "motion",
             "displacement", "expected_displacement", "vertical_range", "expected_rise", "sharpness_ratio",
             "noise_increase", "boundary_jump", "checks", "failed", "passed")


def score(frames: np.ndarray, prompts: list[str], lengths: list[int]) -> dict:
    """Evaluate one generated story; per-clip records without the per-frame series.

    A video the evaluator cannot measure at all (no subject in its first frame) scores every clip
    as failed, with the reason under ``error``.
    """
    from cliploom import evaluate as ev

    try:
        result = ev.evaluate_video(frames, prompts=prompts, clip_lengths=lengths)
    except ValueError as e:
        clips = [{"index": i, "prompt": p, **{k: None for k in CLIP_KEYS[2:-3]}, "checks": {k: None for k in CHECKS},
                  "failed": ["unmeasurable"], "passed": False} for i, p in enumerate(prompts)]
        return {"passed": False, "clips_passed": 0, "error": str(e), "clips": clips, "result": None}
    clips = [{k: c[k] for k in CLIP_KEYS} for c in result["clips"]]
    for clip, snap in zip(clips, snap_backs(result, lengths)):
        clip["snap_back"] = snap
    return {"passed": result["passed"], "clips_passed": result["clips_passed"], "error": None, "clips": clips,
            "result": result}


SNAP_BACK_PX = 1.5  # at the 32 px world; scaled with the frame width


def snap_backs(result: dict, lengths: list[int]) -> list[bool | None]:
    """Per clip: did the subject snap back towards the anchor's position (issue 17's snap-backs)?

    A clip after the first snaps back when its motion check fails and the subject moved towards
    where the story started (its first frame's centroid) at least ``SNAP_BACK_PX`` more than the
    prompted motion would take it there. ``None`` where it cannot be measured (no subject, or the
    subject within ``SNAP_BACK_PX`` of the start already, so there is no direction to snap in).
    """
    cents = np.array([[np.nan, np.nan] if c is None or None in c else c for c in result["per_frame"]["centroid"]],
                     dtype=np.float64)
    scale = result["size"][0] / 32
    start, out, offset = cents[0], [], 0
    for k, (clip, n) in enumerate(zip(result["clips"], lengths)):
        p0, d, e = cents[offset], clip["displacement"], clip["expected_displacement"]
        offset += n
        if k == 0 or clip["checks"]["motion"] is None:
            out.append(None if k else False)
            continue
        if clip["checks"]["motion"]:
            out.append(False)
            continue
        toward = start - p0
        dist = float(np.linalg.norm(toward))
        if np.isnan(dist) or d is None or dist < SNAP_BACK_PX * scale:
            out.append(None)
            continue
        u = toward / dist
        e = np.zeros(2) if e is None else np.asarray(e, dtype=np.float64)
        out.append(bool(float(np.dot(np.asarray(d) - e, u)) >= SNAP_BACK_PX * scale))
    return out


# ----- aggregating ----------------------------------------------------------------------------------
def _mean(values) -> float | None:
    v = [x for x in values if x is not None]
    return round(float(np.mean(v)), 4) if v else None


def _median(values) -> float | None:
    v = [x for x in values if x is not None]
    return round(float(np.median(v)), 4) if v else None


def edge_moves(clips: list[dict]) -> dict:
    """Directed moves (left/right/up/down) prompted with the subject already against the frame edge
    it is told to move into (less than 1 px of room: the evaluator then demands it stays put), and
    how many of them fail the motion check."""
    edge = [c for c in clips if c.get("motion") in ("left", "right", "up", "down")
            and c["checks"].get("motion") is not None and c.get("expected_displacement") is not None
            and float(np.linalg.norm(c["expected_displacement"])) < 1.0]
    return {"measured": len(edge), "failed": sum(c["checks"]["motion"] is False for c in edge)}


def aggregate(stories: list[dict], num_clips: int) -> dict:
    """Pass rates and per-clip-index curves of one run (``stories``: the per-story score records)."""
    by_index = [[s["clips"][k] for s in stories if k < len(s["clips"])] for k in range(num_clips)]
    curves: dict = {}
    for key in CURVE_METRICS:
        curves[key] = {
            "mean": [_mean(c[key] for c in col) for col in by_index],
            "median": [_median(c[key] for c in col) for col in by_index],
            "measured": [sum(c[key] is not None for c in col) for col in by_index],
        }
    curves["pass_rate"] = [_mean(float(c["passed"]) for c in col) for col in by_index]
    curves["subject_kept"] = [_mean(float(c["area_status"] == "kept") for c in col) for col in by_index]
    curves["motion_ok"] = [_mean(float(c["checks"]["motion"] is True) for c in col) for col in by_index]

    all_clips = [c for s in stories for c in s["clips"]]
    checks = {}
    for k in CHECKS:
        measured = [c["checks"][k] for c in all_clips if c["checks"][k] is not None]
        checks[k] = {"pass_rate": _mean(float(v) for v in measured), "measured": len(measured)}
    clean_run = []  # clips before the first failure, per story
    for s in stories:
        n = next((i for i, c in enumerate(s["clips"]) if not c["passed"]), len(s["clips"]))
        clean_run.append(n)
    late = slice(max(0, num_clips - LAST_WINDOW), num_clips)
    return {
        "clips": len(all_clips),
        "clip_pass_rate": _mean(float(c["passed"]) for c in all_clips),
        "stories_clean": sum(s["passed"] for s in stories),
        "stories": len(stories),
        "story_pass_rate": _mean(float(s["passed"]) for s in stories),
        "clean_clips_mean": _mean(clean_run),
        "checks": checks,
        "last_clip": {key: curves[key]["mean"][-1] for key in ("color_delta_e", "background_delta_e", "boundary_jump")}
        | {"pass_rate": curves["pass_rate"][-1]},
        "last_window": {key: _mean(curves[key]["mean"][late]) for key in ("color_delta_e", "background_delta_e",
                                                                            "boundary_jump")},
        "first_clip": {key: curves[key]["mean"][0] for key in ("color_delta_e", "background_delta_e")},
        "first_clip_pass_rate": _mean(float(s["clips"][0]["passed"]) for s in stories if s["clips"]),
        # Every dev clip after the first switches its motion prompt (plan_motions).
        "switched_motion_pass_rate": _mean(float(c["checks"]["motion"] is True) for s in stories
                                           for c in s["clips"][1:]),
        "snap_backs": sum(c.get("snap_back") is True for c in all_clips),
        "edge_moves": edge_moves(all_clips),
        "curves": curves,
    }


def reduction(value: float | None, base: float | None) -> float | None:
    """How much lower ``value`` is than ``base`` (0.5 = halved; negative = higher)."""
    if value is None or base is None or base <= 0:
        return None
    return round(1.0 - value / base, 4)


# ----- plots and markdown ---------------------------------------------------------------------------
def plot_curves(runs: dict, names: list[str], path: Path, title: str) -> Path:
    """Colour ΔE, background ΔE, boundary jump and pass rate vs clip number, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cliploom import evaluate as ev

    panels = [
        ("subject colour ΔE2000 vs anchor (mean)", lambda a: a["curves"]["color_delta_e"]["mean"], ev.SUBJECT_DELTA_E_MAX),
        ("background ΔE2000 vs anchor (mean)", lambda a: a["curves"]["background_delta_e"]["mean"],
         ev.BACKGROUND_DELTA_E_MAX),
        ("boundary jump ratio (mean)", lambda a: a["curves"]["boundary_jump"]["mean"], ev.JUMP_MAX),
        ("clips passing every check", lambda a: a["curves"]["pass_rate"], None),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True, sharex=True)
    for ax, (label, get, threshold) in zip(axes.ravel(), panels):
        for name in names:
            ys = [np.nan if v is None else v for v in get(runs[name]["aggregate"])]
            ax.plot(np.arange(1, len(ys) + 1), ys, "o-", ms=3, label=name)
        if threshold is not None:
            ax.axhline(threshold, color="gray", ls="--", lw=1, label="threshold")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("clip number")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[1, 1].set_ylim(-0.05, 1.05)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _f(v, fmt="{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.0f} %"


def _pct1(v) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def lora_label(run: dict) -> str:
    names = [f"model's own (`{Path(run['svi_lora']).name}`)" if run.get("svi_lora") else None,
             f"`{Path(run['lora']).name}`" if run.get("lora") else None]
    return " + ".join(n for n in names if n) or "none"


def _per_seed(run: dict, key: str, fmt) -> str:
    """``run``'s ``key`` on each sampling seed and their mean ("a / b / c → mean"), or the one value."""
    seeds = run.get("seeds") or []
    values = [s["aggregate"][key] for s in seeds]
    if len(values) < 2:
        return fmt(run["aggregate"][key] if not values else values[0])
    return " / ".join(fmt(v) for v in values) + " → " + fmt(sum(values) / len(values))


def _stories_clean(run: dict) -> str:
    seeds = run.get("seeds") or []
    if len(seeds) < 2:
        return f"{run['aggregate']['stories_clean']}/{run['aggregate']['stories']}"
    n = seeds[0]["aggregate"]["stories"]
    clean = [s["aggregate"]["stories_clean"] for s in seeds]
    return " / ".join(str(c) for c in clean) + f" → {sum(clean) / len(clean):.1f}/{n}"


def run_table(results: dict, names: list[str]) -> list[str]:
    n = results["settings"]["clips"]
    lines = [
        f"| run | LoRA | clips pass | stories clean | clean clips (mean) | colour ΔE clip 1 → {n} | background ΔE clip {n} "
        f"| jump clip {n} (last {LAST_WINDOW}) | " + " | ".join(CHECKS) + " | s / clip |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(CHECKS) + "---|",
    ]
    for name in names:
        r = results["runs"][name]
        a = r["aggregate"]
        checks = " | ".join(_pct(a["checks"][k]["pass_rate"]) for k in CHECKS)
        lines.append(
            f"| {r['label']} | {lora_label(r)} | {_per_seed(r, 'clip_pass_rate', _pct1)} | {_stories_clean(r)} | "
            f"{_f(a['clean_clips_mean'], '{:.1f}')} | {_f(a['first_clip']['color_delta_e'], '{:.1f}')} → "
            f"{_f(a['last_clip']['color_delta_e'], '{:.1f}')} | {_f(a['last_clip']['background_delta_e'], '{:.1f}')} | "
            f"{_f(a['last_clip']['boundary_jump'])} ({_f(a['last_window']['boundary_jump'])}) | {checks} | "
            f"{_f(r['seconds_per_clip'], '{:.2f}')} |"
        )
    return lines


def write_markdown(results: dict, command: str, docs: Path, img_rel: dict) -> None:
    s = results["settings"]
    model = results["model"]
    n = s["clips"]
    lines = [
        "## Quality: drift on the ShapesWorld dev set",
        "",
        f"Command: `{command}` (or `make bench-quality`). Model: `{model['path']}` "
        f"({model['kind']}), {s['width']}x{s['height']}, {s['frames']} frames per clip, {s['steps']} steps, "
        f"guidance {s['guidance']}, {s['device']}. Dev set: {s['stories']} stories x {n} clips, the motion prompt "
        "changes at every clip (see docs/shapesworld.md); every clip scored by `cliploom.evaluate` with the "
        "thresholds documented there." + (
            f" Sampling seeds {', '.join(map(str, s['sample_seeds']))}: *clips pass* and *stories clean* per seed "
            "→ their mean; the other columns over every seed's stories together."
            if len(s.get("sample_seeds", [])) > 1 else ""),
        "",
    ]
    modes = [k for k, r in results["runs"].items() if r["kind"] == "mode"]
    variants = [k for k, r in results["runs"].items() if r["kind"] == "variant"]
    if modes:
        lines += [
            "Modes: " + "; ".join(f"`{m}` = {MODE_NOTES.get(m, MODE_NOTES.get(results['runs'][m]['mode'], 'see docs/story.md'))}"
                                  for m in modes) + "." + (
                f" `pro` and the variants run the model's pro defaults: anchor `{s['anchor']}`, motion memory "
                f"from `{s['memory_from']}` (docs/story.md)." if "memory_from" in s else ""),
            "",
            *run_table(results, modes),
            "",
            f"![drift curves by mode]({img_rel['modes']})",
            "",
        ]
    if variants:
        base = variants[0]
        ba = results["runs"][base]["aggregate"]
        lines += [
            f"### Error-recycling ablation (latent mode; baseline `{base}`)",
            "",
            *run_table(results, variants),
            "",
            f"| variant | colour ΔE clip {n} | cut vs `{base}` | jump clip {n} | cut vs `{base}` | "
            f"colour ΔE last {LAST_WINDOW} | cut | jump last {LAST_WINDOW} | cut |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name in variants:
            a = results["runs"][name]["aggregate"]
            cells = []
            for part in ("last_clip", "last_window"):
                for key in ("color_delta_e", "boundary_jump"):
                    cells += [_f(a[part][key]), _pct(reduction(a[part][key], ba[part][key]))]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Target (issue 5): the error-recycling LoRA cuts subject colour drift and boundary jump at clip {n} by "
            f">= 50 % against the base model and beats the LoRA trained without error recycling.",
            "",
            f"![drift curves by LoRA]({img_rel['ablation']})",
            "",
        ]
    lines += [
        "Columns: *clips pass* = clips passing every check; *stories clean* = stories whose every clip passes; "
        "*clean clips* = clips before a story's first failure; ΔE and jump are means over the stories at that "
        f"clip (jump in brackets: mean over the last {LAST_WINDOW} clips); per-check columns = share of the clips "
        "where the check could be measured that pass it. Per-clip numbers of every run: "
        "`benchmarks/results/quality.json`.",
        "",
    ]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_engine import update_section  # the shared "<!-- name:start -->" section writer

    update_section(docs, "quality", "\n".join(lines))


# ----- main -----------------------------------------------------------------------------------------
def model_kind(path: Path) -> str:
    from cliploom.models.builtin import SHIPPED

    path = Path(path).resolve()
    if path == SHIPPED.resolve():
        return "trained ShapesWorld model"
    return "model folder"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the built-in model)")
    ap.add_argument("--stories", type=int, default=14, help="dev stories (default 14)")
    ap.add_argument("--clips", type=int, default=20, help="clips per story (default 20)")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES),
                    help="comma-separated modes as users run them (default pro,svi2,chain,naive,pro-raw; '' for none; "
                         "naive and pro-raw = chain and pro with colour matching off)")
    ap.add_argument("--variant", action="append", default=[], type=parse_variant, metavar="NAME=LORA|none|default",
                    help="a LoRA run in latent mode (repeatable; the first is the baseline)")
    ap.add_argument("--frames", type=int, help="frames per clip (default: the model's)")
    ap.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    ap.add_argument("--sample-seed", default="0",
                    help="sampling seed(s) over the same dev set, e.g. 0,1,2: each run is generated once per seed "
                         "and the table shows every seed and their mean (default 0)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--sheets", help="also write a contact sheet per story and run into this folder")
    ap.add_argument("--out-root", default=str(ROOT),
                    help="where benchmarks/results/, docs/img/ and docs/benchmarks.md are written (default: the repo)")
    args = ap.parse_args(argv)
    if args.stories < 1 or args.clips < 1:
        ap.error("--stories and --clips must be at least 1")
    from cliploom.story import MODES

    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES and m not in PRESETS]
    if bad:
        ap.error(f"unknown mode(s) {bad}; use among {', '.join([*MODES, *PRESETS])}")
    try:
        args.sample_seeds = [int(x) for x in str(args.sample_seed).split(",") if x.strip()]
    except ValueError:
        ap.error(f"--sample-seed takes integers separated by commas, got {args.sample_seed!r}")
    if not args.sample_seeds or len(set(args.sample_seeds)) != len(args.sample_seeds):
        ap.error(f"--sample-seed needs distinct seeds, got {args.sample_seed!r}")
    args.sample_seed = args.sample_seeds[0]
    names = args.modes + [v.name for v in args.variant]
    if len(set(names)) != len(names):
        ap.error(f"run names must be distinct, got {names}")
    if not names:
        ap.error("nothing to run: give --modes and/or --variant")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("CLIPLOOM_THREADS", "2")))
    from cliploom import evaluate as ev
    from cliploom.cli import _quiet_libraries
    from cliploom.engine import Engine

    _quiet_libraries()
    runs = [mode_run(m) for m in args.modes] + list(args.variant)
    engines: dict = {}
    first = Engine.load(args.model, device=args.device)
    settings = first.model.settings
    own_lora = settings.svi_lora  # the model's own SVI LoRA file name, if it has one

    def loras_of(run: Run) -> tuple:
        """What a run applies: (the model's own SVI LoRA or None, the extra LoRA or None)."""
        return (own_lora if run.svi_lora else None, str(run.lora) if run.lora else None)

    def engine_for(run: Run):
        # one engine per LoRA stack and mode: an engine keeps the stack it first applied, fused or not
        # (pro's image-to-video clip 0 keeps it unfused, svi2 fuses it)
        key = (loras_of(run), run.mode)
        if key not in engines:
            engines[key] = first if not engines else Engine.load(args.model, device=args.device)
        return engines[key]

    frames = args.frames or settings.frames
    overrides = {k: v for k, v in (("frames", args.frames), ("steps", args.steps)) if v is not None}
    devs = dev_set(args.stories, args.clips, frames)
    size = settings.width
    out_root = Path(args.out_root)
    results: dict = {
        "model": {"path": str(first.model.path), "kind": model_kind(first.model.path), "family": settings.family,
                  "svi_lora": own_lora},
        "settings": {"stories": args.stories, "clips": args.clips, "frames": frames,
                     "steps": args.steps or settings.steps, "guidance": settings.guidance, "sample_seed": args.sample_seed,
                     "anchor": settings.anchor, "memory_from": settings.memory_from,
                     "sample_seeds": args.sample_seeds,
                     "width": settings.width, "height": settings.height, "device": args.device,
                     "threads": torch.get_num_threads(), "torch": torch.__version__, "host": platform.node()},
        "thresholds": ev.THRESHOLDS,
        "dev_set": [{"index": d.index, "seed": d.seed, "prompts": d.prompts} for d in devs],
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        refs = []
        for d in devs:
            path = Path(tmp) / f"ref_{d.index:02d}.png"
            d.reference(size).save(path)
            refs.append(path)
        done: dict = {}  # (mode, LoRAs, route, story keys) -> the run that generated it
        for run in runs:
            # A run identical to an earlier one (same mode, LoRAs, route and story keys) is reused.
            key = (run.mode, loras_of(run), run.route, tuple(sorted(run.route_options.items())),
                   tuple(sorted(run.story.items())))
            if key in done:
                same = done[key]
                results["runs"][run.name] = {**results["runs"][same], "kind": run.kind,
                                             "label": run.name if run.kind == "variant" else f"`{run.name}`",
                                             "same_as": same}
                print(f"{run.name}: same as the {same} run", flush=True)
                continue
            done[key] = run.name
            engine = engine_for(run)
            stories, seconds, per_seed = [], 0.0, []
            for seed in args.sample_seeds:
                these = []
                for d, ref in zip(devs, refs):
                    started = time.perf_counter()
                    video, prompts, lengths = generate_story(engine, d, run, ref, overrides, seed)
                    seconds += time.perf_counter() - started
                    scored = score(video, prompts, lengths)
                    if args.sheets and scored["result"] is not None:
                        Path(args.sheets).mkdir(parents=True, exist_ok=True)
                        tail = f"_seed{seed}" if len(args.sample_seeds) > 1 else ""
                        ev.contact_sheet(video, scored["result"],
                                         Path(args.sheets) / f"{run.name}_story{d.index:02d}{tail}.png")
                    scored.pop("result")
                    these.append({"story": d.index, "sample_seed": seed, **scored})
                    print(f"{run.name} seed {seed} story {d.index}: {scored['clips_passed']}/{len(lengths)} clips pass",
                          flush=True)
                per_seed.append({"sample_seed": seed, "aggregate": aggregate(these, args.clips)})
                stories += these
            agg = aggregate(stories, args.clips)  # pooled over the seeds: rates and curves are their means
            label = run.name if run.kind == "variant" else f"`{run.name}`"
            results["runs"][run.name] = {"kind": run.kind, "label": label, "mode": run.mode,
                                         "svi_lora": loras_of(run)[0], "lora": loras_of(run)[1],
                                         "route": run.route, "route_options": run.route_options,
                                         "story": run.story, "seconds_per_clip": round(seconds / (len(stories) * args.clips), 4),
                                         "aggregate": agg, "seeds": per_seed, "stories": stories}
            print(f"{run.name}: {_pct(agg['clip_pass_rate'])} of clips pass, "
                  f"{_stories_clean(results['runs'][run.name])} stories clean", flush=True)

    img_dir = out_root / "docs" / "img"
    names = list(results["runs"])
    modes = [k for k in names if results["runs"][k]["kind"] == "mode"]
    variants = [k for k in names if results["runs"][k]["kind"] == "variant"]
    if modes:
        plot_curves(results["runs"], modes, img_dir / "quality_modes.png",
                    f"ShapesWorld dev set, {args.stories} stories: drift by mode")
    if variants:
        plot_curves(results["runs"], variants, img_dir / "quality_ablation.png",
                    f"ShapesWorld dev set, {args.stories} stories, latent mode: drift by LoRA")
    out = out_root / "benchmarks" / "results" / "quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    command = " ".join(["python", "benchmarks/bench_quality.py", *(argv if argv is not None else sys.argv[1:])])
    write_markdown(results, command, out_root / "docs" / "benchmarks.md",
                   {"modes": "img/quality_modes.png", "ablation": "img/quality_ablation.png"})
    print(f"wrote {out}, {img_dir}/quality_*.png and the quality section of {out_root / 'docs' / 'benchmarks.md'}")
    return results


if __name__ == "__main__":
    main()
