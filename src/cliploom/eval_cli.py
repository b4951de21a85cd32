"""``cliploom eval``: score a generated video clip by clip.

    cliploom eval out/demo.mp4                         # clips from out/demo.json (the report)
    cliploom eval video.mp4 --story story.yaml         # clips from the story file
    cliploom eval video.mp4 --report run.json --out eval/ --json
    cliploom eval any.mp4 --clip-frames 76             # any video: generic drift metrics

Two kinds of metrics (``--metrics``, default ``auto``): ``shapesworld`` scores a ShapesWorld video
against what its prompts say (docs/shapesworld.md); ``generic`` measures drift from the pixels
alone, for any video (colour and brightness drift, seam flicker, frozen clips, similarity vs
frame gap; ``cliploom.drift``). ``auto`` picks ShapesWorld when every clip prompt is one.

Writes ``<video>.eval.json``, ``<video>.eval_metrics.png`` (metrics vs clip index) and
``<video>.eval_contact.png`` (first / middle / last frame of every clip), prints one line per
clip and a verdict. Exit status: 0 every clip passes, 1 some clip fails, 2 bad input.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import CliploomError

EXIT_PASS, EXIT_FAIL = 0, 1


def add_command(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="score a video clip by clip: drift, seams, frozen motion (ShapesWorld: against its prompts)",
        description="Score a video clip by clip. Clip boundaries (and prompts) come from the report beside the "
        "video (x.json for x.mp4), from --report, from --story, or from --clip-frames. ShapesWorld videos are "
        "scored against their prompts (docs/shapesworld.md); any other video gets generic drift metrics. "
        "Exit status: 0 pass, 1 fail, 2 bad input.",
    )
    p.add_argument("video", help="the video: x.mp4, or a folder of frame_*.png")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--story", help="story YAML the video was generated from (instead of the report)")
    src.add_argument("--report", help="the engine's JSON report (default: the one beside the video)")
    src.add_argument("--clip-frames", type=int, metavar="N", help="no report: the video is clips of N frames")
    p.add_argument("--metrics", choices=("auto", "shapesworld", "generic"), default="auto",
                   help="shapesworld: against the prompts; generic: any video (default: shapesworld when the "
                   "prompts are ShapesWorld prompts)")
    p.add_argument("--out", "-o", help="folder for the JSON, plot and contact sheet (default: the video's folder)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON instead of the summary")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from . import evaluate as ev

    video = Path(args.video).expanduser()
    if not video.exists():
        raise CliploomError(f"video {video} not found", "pass the MP4 (or PNG folder) that `cliploom generate` wrote")
    frames = _read(video)
    prompts, lengths, source = _clips(args, video, len(frames))
    if sum(lengths) != len(frames):
        raise CliploomError(
            f"{source} describes {sum(lengths)} frames in {len(lengths)} clips but {video} has {len(frames)}",
            "pass the report written together with this video, or regenerate it",
        )
    metrics = args.metrics
    if metrics == "auto":
        metrics = "shapesworld" if prompts and _shapesworld_prompts(prompts) else "generic"
    if metrics == "shapesworld":
        if not prompts:
            raise CliploomError("ShapesWorld metrics need the clip prompts", "pass --report or --story, or --metrics generic")
        _check_prompts(prompts, source)
        try:
            result = ev.evaluate_video(frames, prompts=prompts, clip_lengths=lengths)
        except ValueError as e:  # e.g. no subject in the first frame: nothing to measure against
            raise _error(e, "check that the video was generated from these ShapesWorld prompts") from None
        result["metrics"] = "shapesworld"
    else:
        from .drift import drift_metrics

        result = drift_metrics(frames, lengths, prompts)
    result.update(video=str(video), clip_source=str(source))
    out = Path(args.out).expanduser() if args.out else (video if video.is_dir() else video.parent)
    from .inputs import check_writable

    check_writable(out, "choose a writable --out folder")
    stem = "eval" if video.is_dir() else f"{video.stem}.eval"
    if metrics == "shapesworld":
        result["outputs"] = ev.write_outputs(frames, result, out, stem)
    else:
        result["outputs"] = _write_generic(frames, result, out, stem)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        generic = result["metrics"] == "generic"
        for clip in result["clips"]:
            print(generic_line(clip) if generic else clip_line(clip))
        print(generic_verdict(result) if generic else verdict_line(result))
        print("wrote " + ", ".join(result["outputs"].values()))
    return EXIT_PASS if result["passed"] else EXIT_FAIL


def clip_line(c: dict) -> str:
    """One clip's numbers on one line: verdict, drift, subject, motion, sharpness, boundary jump."""

    def num(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    verdict = "PASS" if c["passed"] else "FAIL"
    motion = {True: "ok", False: "WRONG", None: "n/a"}[c["checks"]["motion"]]
    line = (
        f"clip {c['index']:>2} {verdict}  dE {num(c['color_delta_e']):>5}  bg {num(c['background_delta_e']):>5}  "
        f"area {num(c['area_ratio'], '{:.2f}')} {c['area_status']:<7}  {c['motion']:<6} {motion:<5}  "
        f"sharp {num(c['sharpness_ratio'], '{:.2f}')}  jump {num(c['boundary_jump'])}"
    )
    if c.get("expected_rise") is not None:  # a bounce: the hop measured / the world's
        line += f"  hop {c['vertical_range']:.1f}/{c['expected_rise']:.1f}"
    if not c["passed"]:
        line += "  failed: " + ", ".join(c["failed"] or ["area"])
    return line


def verdict_line(result: dict) -> str:
    """The verdict: clips passed, and how many clips failed each check (most frequent first)."""
    from collections import Counter

    counts = Counter(k for c in result["clips"] for k in (c["failed"] or ([] if c["passed"] else ["area"])))
    head = f"{'PASS' if result['passed'] else 'FAIL'}: {result['clips_passed']}/{result['num_clips']} clips pass"
    if not counts:
        return head
    return head + " (clips failing each check: " + ", ".join(f"{k} {n}" for k, n in counts.most_common()) + ")"


def _shapesworld_prompts(prompts: list[str]) -> bool:
    from .shapesworld.vocab import parse_prompt

    try:
        for p in prompts:
            parse_prompt(p)
    except ValueError:
        return False
    return True


def _write_generic(frames, result: dict, out: Path, stem: str) -> dict:
    from .drift import describe_clip, plot_drift
    from .evaluate import contact_sheet

    outputs = {"json": str(out / f"{stem}.json"), "plot": str(out / f"{stem}_metrics.png"),
               "contact_sheet": str(out / f"{stem}_contact.png")}
    plot_drift(result, outputs["plot"])
    contact_sheet(frames, result, outputs["contact_sheet"], describe=describe_clip)
    (out / f"{stem}.json").write_text(json.dumps({**result, "outputs": outputs}, indent=2) + "\n")
    return outputs


def generic_line(c: dict) -> str:
    seam = "" if c["seam_jump"] is None else f"  seam {c['seam_jump']:4.1f}"
    verdict = "ok  " if c["passed"] else "FLAG"
    flags = "" if c["passed"] else "  (" + ", ".join(c["flags"]) + ")"
    return (f"clip {c['index']:2d} {verdict}  dE {c['color_delta_e_vs_first']:5.1f}  dL {c['brightness_change']:+5.1f}  "
            f"motion {c['motion_energy']:5.2f}{seam}{flags}")


def generic_verdict(result: dict) -> str:
    se = result["start_end"]
    head = "PASS" if result["passed"] else "FAIL"
    return (f"{head}: {result['clips_passed']}/{result['num_clips']} clips unflagged; start vs end (first/last "
            f"{se['frames']} frames): colour dE {se['color_delta_e']:.1f}, brightness dL {se['brightness_change']:+.1f}")


def _read(video: Path):
    import av

    from .evaluate import read_frames
    from .inputs import available_memory, check_regular, human_bytes

    fix = "pass the MP4 (or PNG folder) that `cliploom generate` wrote"
    if not video.is_dir():
        check_regular(video, "video", fix)
        try:
            with av.open(str(video)) as container:
                stream = container.streams.video[0]
                need = stream.frames * stream.codec_context.width * stream.codec_context.height * 3
        except (av.error.FFmpegError, OSError, IndexError) as e:
            reason = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CliploomError(f"cannot read video {video}: {reason}", fix) from None
        have = available_memory()
        if have is not None and need > have // 2:
            raise CliploomError(f"video {video} decodes to {human_bytes(need)}, more than this machine can hold",
                                "evaluate a shorter or smaller video")
    try:
        return read_frames(video)
    except (av.error.FFmpegError, OSError) as e:  # a broken container or image: one line, no traceback
        reason = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CliploomError(f"cannot read video {video}: {reason}", "pass an MP4 file or a folder of PNG frames") from None
    except ValueError as e:
        raise _error(e, "pass the MP4 (or PNG folder) that `cliploom generate` wrote") from None


def _clips(args, video: Path, num_frames: int) -> tuple[list[str], list[int], Path]:
    """(prompts, frames per clip, where they came from): the story, the given report or the one beside the video."""
    from .evaluate import clips_from_report, clips_from_story, find_report

    if getattr(args, "clip_frames", None) is not None:
        n = args.clip_frames
        if not 1 <= n <= num_frames:
            raise CliploomError(f"--clip-frames {n} must be between 1 and the video's {num_frames} frames",
                                "pass the frames each clip put in the video, e.g. 76 for 81-frame clips with K = 1")
        lengths = [n] * (num_frames // n) + ([num_frames % n] if num_frames % n else [])
        return None, lengths, Path(f"--clip-frames {n}")
    if args.story:
        from .story import load_story

        story = load_story(Path(args.story).expanduser())
        try:
            prompts, lengths = clips_from_story(story, num_frames)
        except ValueError as e:
            raise _error(e, "pass the report written beside the video (--report), or set `frames:` in the story") from None
        return prompts, lengths, Path(args.story)
    if args.report:
        report = Path(args.report).expanduser()
    else:
        report = find_report(video)
        if report is None:
            beside = video / "report.json" if video.is_dir() else video.with_suffix(".json")
            raise CliploomError(
                f"no report beside {video} (looked for {beside})",
                "pass --report REPORT.json, --story STORY.yaml or --clip-frames N",
            )
    from .inputs import read_json

    data = read_json(report, "report", "pass the JSON report `cliploom generate` wrote")
    try:
        prompts, lengths = clips_from_report(data)
    except (ValueError, TypeError, AttributeError) as e:
        raise _error(e if isinstance(e, ValueError) else ValueError(f"{report} is not a cliploom report"),
                     "pass the JSON report `cliploom generate` wrote, or --story") from None
    return prompts, lengths, report


def _check_prompts(prompts: list[str], source: Path) -> None:
    from .shapesworld.vocab import parse_prompt

    for i, prompt in enumerate(prompts):
        try:
            parse_prompt(prompt)
        except ValueError as e:
            problem = str(e).split("; ")[0]
            raise CliploomError(
                f"{source}: clip {i}: {problem} - the evaluator scores ShapesWorld videos only",
                "use grammar prompts such as 'a big red circle moves left on a navy background' "
                "(`cliploom shapesworld vocab` lists the words)",
            ) from None


def _error(e: Exception, fix: str) -> CliploomError:
    """A library ValueError as a one-line CliploomError (its own '; fix' part, if any, is kept)."""
    text = " ".join(str(e).split())
    if "; " in text:
        problem, own_fix = text.split("; ", 1)
        return CliploomError(problem, own_fix)
    return CliploomError(text, fix)
