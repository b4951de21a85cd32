"""Routes on one drift table (issue 17): the dev set of bench_quality (14 stories x 20 clips, the
motion prompt switching at every clip) through every long-video route, over sampling seeds.

    python benchmarks/bench_routes.py [--runs svi,chain,df,causal] [--knobs] [--seeds 0,1,2]
        [--weights ROUTE=LORA.safetensors ...] [--clips 20] [--stories 14] [--no-resources]

A run is ``ROUTE`` or ``NAME=ROUTE[:KEY=VALUE...]`` (route options, docs/routes.md); ``chain`` is
naive chaining (the ``chain`` mode, no LoRA), ``svi`` the shipped SVI LoRA in ``pro`` mode.
Weights of a route come from the model's ``route_loras`` unless ``--weights ROUTE=FILE`` names a
LoRA (one the trainer just wrote). ``--knobs`` adds the knob rows of issue 17 (context noise,
sink, window, re-cache, RoPE jitter, ar_step, rebased positions). Every clip is scored by ``cliploom.evaluate``; a
*snap-back* is a failed motion towards where the story started (``bench_quality.snap_backs``).

Resources (``--no-resources`` skips them), each in a fresh process on dev story 0: seconds to the
first frames (the first streamed block on the causal route, the first clip elsewhere), peak RSS generating 2 clips and 20 clips (their ratio: memory that grows with length).

Writes ``benchmarks/results/routes.json``, ``docs/img/routes_drift.png`` and the section between
``<!-- routes:start -->`` and ``<!-- routes:end -->`` of ``docs/routes.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUNS = ("svi", "chain", "df", "causal")
KNOB_RUNS = (
    "df addnoise 0=df:addnoise=0", "df addnoise 20=df:addnoise=20", "df addnoise 50=df:addnoise=50",
    "causal no sink=causal:sink=0", "causal window 1=causal:window=1", "causal window 4=causal:window=4",
    "causal recache=causal:recache=true", "causal jitter 0.4=causal:rope_jitter=0.4",
    "causal jitter 0.8=causal:rope_jitter=0.8", "causal block 3=causal:block=3",
    "df ar_step 2=df:ar_step=2", "causal rebased=causal:positions=rebased",
)


@dataclass
class RouteRun:
    name: str
    route: str  # a route of cliploom.routes, or "chain" (the chain mode)
    options: dict = field(default_factory=dict)
    seeds: list[int] | None = None  # sampling seeds of this run (None: --seeds)
    sampling: dict = field(default_factory=dict)  # story sampling settings of this run (steps, guidance)
    lora: str | None = None  # this run's route LoRA (instead of --weights / the model's): e.g. a twin


SAMPLING_KEYS = ("steps", "guidance")  # story settings a run may set (the route's otherwise)


def parse_run(text: str) -> RouteRun:
    """``[NAME=]ROUTE[:KEY=VALUE...]``; KEY a route option, ``steps`` / ``guidance`` (the story's
    sampling: e.g. causal stage 1 at the self-forcing student's step count), ``sampler`` (``euler`` or
    ``renoise``; the self-forcing route's default is renoise), or ``lora`` (the run's own route LoRA,
    e.g. a twin trained without one setting), ``first_clip`` (``pro`` or ``i2v``, on svi, df and helios), ``color_match`` (``none``, ``anchor`` or
    ``previous``: the story's colour matching)."""
    from cliploom.routes import ROUTES, option_error, parse_option

    head, *pairs = text.split(":")
    name, _, route = head.rpartition("=")
    if route != "chain" and route not in ROUTES:
        raise SystemExit(f"error: run {text!r}: unknown route {route!r}; routes: chain, {', '.join(ROUTES)}")
    options, sampling, lora = {}, {}, None
    for pair in pairs:
        key, value = parse_option(pair)
        if key == "lora":
            if not Path(str(value)).is_file():
                raise SystemExit(f"error: run {text!r}: lora {value} is not a file")
            lora = str(Path(str(value)).resolve())
            continue
        if key == "first_clip":
            from cliploom.story import FIRST_CLIPS

            if value not in FIRST_CLIPS:
                raise SystemExit(f"error: run {text!r}: first_clip must be one of {', '.join(FIRST_CLIPS)}")
            sampling[key] = value
            continue
        if key == "color_match":  # e.g. none: the route's drift without the engine's colour matching
            from cliploom.colour import MODES

            if value not in MODES:
                raise SystemExit(f"error: run {text!r}: color_match must be {', '.join(MODES[:-1])} or {MODES[-1]}")
            sampling[key] = value
            continue
        if key == "sampler":
            from cliploom.story import SAMPLERS

            if value not in SAMPLERS:
                raise SystemExit(f"error: run {text!r}: sampler must be one of {', '.join(SAMPLERS)}")
            sampling[key] = value
            continue
        if key in SAMPLING_KEYS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise SystemExit(f"error: run {text!r}: {key} must be a positive number")
            sampling[key] = value
            continue
        if (err := option_error(route, key, value)) is not None:
            raise SystemExit(f"error: run {text!r}: {err[0]}")
        options[key] = value
    return RouteRun(name or text, route, options, sampling=sampling, lora=lora)


def story_keys(run: RouteRun, weights: dict) -> dict:
    """make_story keys of one run."""
    if run.route == "chain":
        return {"mode": "chain", "svi_lora": False,
                **{k: run.sampling[k] for k in ("sampler", "color_match") if k in run.sampling}}
    keys: dict = {"mode": "pro"}
    if "steps" in run.sampling:
        keys["steps"] = int(run.sampling["steps"])
    if "guidance" in run.sampling:  # one scale over every step
        keys["guidance"] = keys["guidance_low"] = float(run.sampling["guidance"])
    if "sampler" in run.sampling:
        keys["sampler"] = run.sampling["sampler"]
    if "first_clip" in run.sampling:
        keys["first_clip"] = run.sampling["first_clip"]
    if "color_match" in run.sampling:
        keys["color_match"] = run.sampling["color_match"]
    if run.route != "svi":
        keys.update(route=run.route, route_options=run.options)
    lora = run.lora or weights.get(run.route)
    if lora:
        from cliploom.story import LoraSpec

        keys["loras"] = [LoraSpec(Path(lora), name=run.route)]  # the route's LoRA (first_clip: i2v turns svi / df off)
        keys["svi_lora"] = False
    return keys


def setup_torch() -> None:
    """A benchmark process: ``CLIPLOOM_THREADS`` threads (2 by default), the libraries' chatter off."""
    import torch

    from cliploom.cli import _quiet_libraries

    torch.set_num_threads(int(os.environ.get("CLIPLOOM_THREADS", "2")))
    _quiet_libraries()


def route_clips(engine, dev, run: RouteRun, weights: dict, reference: Path, seed: int, on_block=None,
                fuse: bool = False):
    """The clips of one dev story on ``run``'s route, as every route benchmark makes them (sampling
    ``seed`` moves the noise only; the causal routes stream per block into ``on_block``). Unfused
    LoRAs by default, so that one engine can switch stacks between runs; ``fuse`` as a CLI run on a
    fresh engine has them (``fuse_loras``' default; the SVI route's image-to-video first clip keeps
    its stack unfused either way)."""
    from cliploom.routes import CAUSAL_ROUTES
    from cliploom.story import ClipSpec, make_story

    story = make_story(clips=[ClipSpec(p) for p in dev.prompts], reference=reference, seed=dev.story_seed(seed),
                       fuse_loras=fuse, **story_keys(run, weights))
    stream = {"on_block": on_block or (lambda *_: None)} if run.route in CAUSAL_ROUTES else {}
    return engine.generate(story, progress=False, **stream)


def generate(engine, dev, run: RouteRun, weights: dict, reference: Path, seed: int, fuse: bool = False):
    """Frames, prompts, frames per clip and seconds to the first frames of one dev story (the first
    streamed block on the causal routes, else the first clip)."""
    out, started, first = [], time.perf_counter(), []

    def seen(*_):
        if not first:
            first.append(time.perf_counter() - started)

    for clip in route_clips(engine, dev, run, weights, reference, seed, on_block=seen, fuse=fuse):
        seen()
        out.append(clip)
    frames = np.concatenate([c.frames.numpy() for c in out])
    return frames, [c.prompt for c in out], [int(c.frames.shape[0]) for c in out], first[0]


def mean_over(seeds: list[dict], path: tuple) -> float | None:
    vals = []
    for agg in seeds:
        v = agg
        for k in path:
            v = v[k]
        if v is not None:
            vals.append(float(v))
    return round(float(np.mean(vals)), 4) if vals else None


def rss_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset the peak RSS (``VmHWM``) to the current RSS: Linux's ``clear_refs`` value 5."""
    Path("/proc/self/clear_refs").write_text("5")


def measure_resources(model: str, run: RouteRun, weights: dict, clips: int) -> dict:
    """Peak RSS while generating (MiB; the peak is reset after loading) and seconds to the first
    frames of dev story 0 with ``clips`` clips, in a fresh process."""
    code = f"""
import json, resource, sys, tempfile, time, torch
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
torch.set_num_threads({int(os.environ.get('CLIPLOOM_THREADS', '2'))})
import bench_quality as bq, bench_routes as br
from cliploom.cli import _quiet_libraries
from cliploom.engine import Engine
_quiet_libraries()
engine = Engine.load({model!r})
dev = bq.dev_set(1, {clips}, engine.model.settings.frames)[0]
run = br.RouteRun({run.name!r}, {run.route!r}, {run.options!r}, sampling={run.sampling!r}, lora={run.lora!r})
with tempfile.TemporaryDirectory() as tmp:
    ref = Path(tmp) / "ref.png"
    dev.reference(engine.model.settings.width).save(ref)
    before = br.rss_mib("VmRSS")
    br.reset_peak_rss()  # the peak of loading is not the peak of generating
    frames, prompts, lengths, first = br.generate(engine, dev, run, {weights!r}, ref, 0)
print(json.dumps(dict(peak_mib=br.rss_mib("VmHWM"), loaded_mib=before, first_frames_s=first, clips=len(lengths))))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"error: resources of {run.name} ({clips} clips) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _f(v, fmt="{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def table(results: dict) -> list[str]:
    n = results["settings"]["clips"]
    seeds = results["settings"]["seeds"]
    lines = [
        f"| run | route options | clips pass | stories clean | first clip | motion on switched clips | snap-backs "
        f"| colour ΔE clip 1 → {n} | background ΔE clip {n} | jump clip {n} | s / clip | first frames s "
        "| peak RSS 20 / 2 clips |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["runs"].items():
        m = r["mean"]
        per_seed = " / ".join(f"{100 * a['clip_pass_rate']:.1f}" for a in r["seeds"])
        clean = " / ".join(str(a["stories_clean"]) for a in r["seeds"])
        res = r.get("resources") or {}
        ratio = (res["clips_20"]["peak_mib"] / res["clips_2"]["peak_mib"]) if res else None
        opts = ", ".join(f"{k}={v}" for k, v in {**r["options"], **r.get("sampling", {})}.items()) or "defaults"
        if r.get("lora"):
            opts += f", LoRA {Path(r['lora']).name}"
        if r.get("sampling_seeds", seeds) != seeds:
            name = f"{name} (seed{'s' if len(r['sampling_seeds']) > 1 else ''} {', '.join(map(str, r['sampling_seeds']))})"
        lines.append(
            f"| {name} | {opts} | {_pct(m['clip_pass_rate'])} ({per_seed}) | {_f(m['stories_clean'], '{:.1f}')}/"
            f"{r['seeds'][0]['stories']} ({clean}) | {_pct(m['first_clip_pass_rate'])} | "
            f"{_pct(m['switched_motion_pass_rate'])} | {_f(m['snap_backs'], '{:.1f}')} | "
            f"{_f(m['color_first'], '{:.1f}')} → {_f(m['color_last'], '{:.1f}')} | {_f(m['background_last'], '{:.1f}')} | "
            f"{_f(m['jump_last'])} | {_f(r['seconds_per_clip'])} | "
            f"{_f(res.get('clips_2', {}).get('first_frames_s'))} | {_f(ratio, '{:.3f}')} |"
        )
    lines += ["", f"Means over sampling seeds {', '.join(map(str, seeds))} (each seed's value in brackets; a row "
              "measured on fewer seeds says so in its name)."]
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    seeds = results["settings"]["seeds"]
    for name, r in results["runs"].items():  # the main runs (all seeds); the knob rows are in the table
        if r.get("sampling_seeds", seeds) != seeds:
            continue
        for ax, key in zip(axes, ("pass_rate", "color_delta_e", "boundary_jump")):
            curves = [a["curves"][key] if key == "pass_rate" else a["curves"][key]["mean"] for a in r["seeds"]]
            y = [np.mean([c[i] for c in curves if c[i] is not None]) if any(c[i] is not None for c in curves)
                 else np.nan for i in range(len(curves[0]))]
            ax.plot(np.arange(1, len(y) + 1), y, marker=".", label=name)
    for ax, title in zip(axes, ("clips passing", "subject colour ΔE to the anchor", "boundary jump")):
        ax.set_title(title)
        ax.set_xlabel("clip")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"ShapesWorld dev set: drift against clip index by route (mean over sampling seeds {seeds})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _shown(path: str) -> str:
    """A path inside the repository as a relative path (the docs are read on other machines)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


def write_markdown(results: dict, doc: Path) -> None:
    s = results["settings"]
    command = results.get("command", "?") + (f"`, resources again: `{results['resources_command']}"
                                             if results.get("resources_command") else "")
    section = [
        "<!-- routes:start -->",
        f"Command: `{command}`. Model `{_shown(results['model'])}`, {s['stories']} dev stories x {s['clips']} clips "
        f"({s['frames']} frames each), the motion prompt switching at every clip; weights: "
        + (", ".join(f"{k} `{Path(v).name}`" for k, v in s["weights"].items()) or "the model's own") + "."
        + "".join(f" Rows {'removed' if '--drop' in c.split() else 'added'} by `{c}`."
                  for c in results.get("merged_commands", [])),
        "",
        *table(results),
        "",
        "![drift against clip index by route](img/routes_drift.png)",
        "<!-- routes:end -->",
    ]
    text = doc.read_text() if doc.exists() else "# Routes\n"
    if "<!-- routes:start -->" in text:
        head, rest = text.split("<!-- routes:start -->", 1)
        tail = rest.split("<!-- routes:end -->", 1)[1]
        text = head + "\n".join(section) + tail
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(section) + "\n"
    doc.write_text(text)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--runs", default=",".join(DEFAULT_RUNS), help="comma-separated runs (ROUTE or NAME=ROUTE:K=V)")
    ap.add_argument("--knobs", action="store_true", help="add the knob rows of issue 17")
    ap.add_argument("--weights", action="append", default=[], metavar="ROUTE=LORA",
                    help="a route's LoRA instead of the model's route_loras (repeatable)")
    ap.add_argument("--seeds", default="0,1,2", help="sampling seeds (default 0,1,2)")
    ap.add_argument("--knob-seeds", default=None, help="sampling seeds of the knob rows (default: --seeds)")
    ap.add_argument("--stories", type=int, default=14)
    ap.add_argument("--clips", type=int, default=20)
    ap.add_argument("--no-resources", action="store_true", help="skip the time-to-first-clip and RSS runs")
    ap.add_argument("--out-root", default=str(ROOT), help="where results, docs/img and docs/routes.md go")
    ap.add_argument("--merge", action="store_true",
                    help="add these runs to the results already in --out-root (replacing runs of the same name)")
    ap.add_argument("--resources-only", action="store_true",
                    help="measure the resources of the main runs again into an existing routes.json")
    ap.add_argument("--drop", default=None, metavar="NAMES",
                    help="comma-separated run names to remove from the results in --out-root (e.g. rows measured on "
                         "the wrong weights); nothing is run")
    args = ap.parse_args(argv)
    if args.drop is not None:
        args.drop = [n.strip() for n in args.drop.split(",") if n.strip()]
        if not args.drop:
            raise SystemExit("error: --drop: give the names of the runs to remove, comma-separated")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    knob_seeds = [int(s) for s in args.knob_seeds.split(",")] if args.knob_seeds else args.seeds
    knobs = [parse_run(t) for t in KNOB_RUNS] if args.knobs else []
    for run in knobs:
        run.seeds = knob_seeds
    args.runs = [parse_run(t) for t in args.runs.split(",") if t] + knobs
    weights = {}
    for w in args.weights:
        route, _, path = w.partition("=")
        if not path or not Path(path).is_file():
            raise SystemExit(f"error: --weights {w}: not ROUTE=FILE with an existing LoRA file")
        weights[route] = str(Path(path).resolve())
    args.weights = weights
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from cliploom.engine import Engine

    setup_torch()
    out_root = Path(args.out_root)
    out = out_root / "benchmarks" / "results" / "routes.json"
    if (args.drop is not None or args.resources_only) and not out.is_file():
        raise SystemExit(f"error: {out} does not exist; run the table first (--runs ...)")
    if args.drop is not None:
        results = json.loads(out.read_text())
        missing = [n for n in args.drop if n not in results["runs"]]
        if missing:
            raise SystemExit(f"error: --drop: no run named {', '.join(map(repr, missing))} in {out}")
        for name in args.drop:
            del results["runs"][name]
        log_command(results, argv)
        return finish(results, out, out_root, argv, None)
    if args.resources_only:
        results = json.loads(out.read_text())
        for run in args.runs:
            if run.seeds is None and run.name in results["runs"]:
                results["runs"][run.name]["resources"] = {
                    f"clips_{n}": measure_resources(args.model, run, args.weights, n) for n in (2, 20)}
        return finish(results, out, out_root, argv, "resources_command")
    engines: dict = {}
    first_engine = Engine.load(args.model)
    settings = first_engine.model.settings
    devs = bq.dev_set(args.stories, args.clips, settings.frames)
    results: dict = {"model": str(first_engine.model.path),
                     "settings": {"stories": args.stories, "clips": args.clips, "frames": settings.frames,
                                  "seeds": args.seeds, "weights": args.weights, "threads": torch.get_num_threads()},
                     "runs": {}}
    if args.merge:  # these runs go into the table already there (same dev set and settings)
        before = json.loads(out.read_text())
        if before["settings"]["stories"] != args.stories or before["settings"]["clips"] != args.clips:
            raise SystemExit(f"error: --merge: {out} was made with {before['settings']['stories']} stories x "
                             f"{before['settings']['clips']} clips; run with the same --stories/--clips")
        before["settings"]["weights"] = {**before["settings"].get("weights", {}), **args.weights}
        log_command(before, argv)
        results["settings"], results["runs"] = before["settings"], dict(before["runs"])
        results["command"] = before.get("command")
        results["merged_commands"] = before["merged_commands"]
        for key in ("resources_command",):
            if key in before:
                results[key] = before[key]
    with tempfile.TemporaryDirectory() as tmp:
        refs = []
        for d in devs:
            refs.append(Path(tmp) / f"ref_{d.index:02d}.png")
            d.reference(settings.width).save(refs[-1])
        for run in args.runs:
            key = json.dumps(story_keys(run, {}) | {"w": run.lora or args.weights.get(run.route)}, default=str,
                             sort_keys=True)
            engine = engines.setdefault(key, first_engine if not engines else Engine.load(args.model))
            per_seed, seconds = [], 0.0
            seeds = run.seeds or args.seeds
            for seed in seeds:
                stories = []
                for d, ref in zip(devs, refs):
                    started = time.perf_counter()
                    frames, prompts, lengths, _ = generate(engine, d, run, args.weights, ref, seed)
                    seconds += time.perf_counter() - started
                    scored = bq.score(frames, prompts, lengths)
                    scored.pop("result")
                    stories.append({"story": d.index, **scored})
                agg = bq.aggregate(stories, args.clips)
                agg.pop("checks", None)
                per_seed.append(agg)
                print(f"{run.name} seed {seed}: {100 * agg['clip_pass_rate']:.1f} % of clips pass, "
                      f"{agg['stories_clean']}/{agg['stories']} clean, snap-backs {agg['snap_backs']}", flush=True)
            mean = {
                "clip_pass_rate": mean_over(per_seed, ("clip_pass_rate",)),
                "stories_clean": mean_over(per_seed, ("stories_clean",)),
                "first_clip_pass_rate": mean_over(per_seed, ("first_clip_pass_rate",)),
                "switched_motion_pass_rate": mean_over(per_seed, ("switched_motion_pass_rate",)),
                "snap_backs": mean_over(per_seed, ("snap_backs",)),
                "color_first": mean_over(per_seed, ("first_clip", "color_delta_e")),
                "color_last": mean_over(per_seed, ("last_clip", "color_delta_e")),
                "background_last": mean_over(per_seed, ("last_clip", "background_delta_e")),
                "jump_last": mean_over(per_seed, ("last_clip", "boundary_jump")),
            }
            entry = {"route": run.route, "options": run.options, **({"sampling": run.sampling} if run.sampling else {}),
                     **({"lora": run.lora} if run.lora else {}),
                     "mean": mean, "seeds": per_seed,
                     "sampling_seeds": seeds,
                     "seconds_per_clip": round(seconds / (len(seeds) * len(devs) * args.clips), 4)}
            if not args.no_resources and run.seeds is None:  # the main runs; knob rows are about drift
                entry["resources"] = {f"clips_{n}": measure_resources(args.model, run, args.weights, n) for n in (2, 20)}
            results["runs"][run.name] = entry
    return finish(results, out, out_root, argv, None if args.merge else "command")


def command_line(argv) -> str:
    return " ".join(["python", "benchmarks/bench_routes.py", *(argv if argv is not None else sys.argv[1:])])


def log_command(results: dict, argv) -> None:
    """Record a --merge / --drop command under the table, once: a command run again (the same row
    re-measured) moves to the end instead of repeating."""
    line = command_line(argv)
    results["merged_commands"] = [c for c in results.get("merged_commands", []) if c != line] + [line]


def finish(results: dict, out: Path, out_root: Path, argv, key: str | None) -> dict:
    if key is not None:
        results[key] = command_line(argv)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out_root / "docs" / "img" / "routes_drift.png")
    write_markdown(results, out_root / "docs" / "routes.md")
    print("\n".join(table(results)))
    return results


if __name__ == "__main__":
    main()
