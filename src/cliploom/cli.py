"""Command line: argument parsing only. Every command calls the Python API users call."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import CliploomError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _lora_arg(text: str):
    """``FILE[:WEIGHT[:EXPERT]]``; the weight defaults to 1 and the expert to both."""
    from .story import EXPERTS, LoraSpec

    parts = text.split(":")
    expert = parts.pop() if len(parts) > 1 and parts[-1] in EXPERTS else "both"
    weight = 1.0
    if len(parts) > 1:
        try:
            weight = float(parts[-1])
            parts.pop()
        except ValueError:
            pass
    return LoraSpec(Path(":".join(parts)).expanduser(), weight, expert)


def _timesteps_arg(text: str) -> list[float]:
    try:
        return [float(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"timesteps must be numbers separated by commas, got {text!r}") from None


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate a long video from a story file or from flags",
        description="Generate a long video clip by clip. Give a STORY.yaml, or --image and --prompt.",
    )
    p.add_argument("story", nargs="?", help="story YAML file (see docs/story.md)")
    p.add_argument("--out", "-o", help="x.mp4 (H.264) or DIR/ (PNG frames); default out/<story>.mp4")
    p.add_argument("--image", help="reference image (the anchor)")
    p.add_argument("--prompt", action="append", default=[], help="a clip prompt; repeat for several (they cycle)")
    p.add_argument("--clips", type=int, help="number of clips (default: one per --prompt)")
    p.add_argument("--model", help="diffusers-layout Wan I2V folder, or original Wan/ComfyUI files with --family "
                   "(default: the built-in model)")
    p.add_argument("--mode", help="pro (latent motion) | film | shot | svi2 | tom | chain")
    p.add_argument("--frames", type=int, help="frames per clip, 4k+1")
    p.add_argument("--motion-latents", type=int, help="K latent frames of motion memory (pro mode, 1-3)")
    p.add_argument("--motion-frames", type=int, help="N motion frames (pixel modes)")
    p.add_argument("--ref-pad", type=int, help="pixel-mode padding: -1 reference, 0 zeros, k reference frames")
    p.add_argument("--steps", type=int, help="Euler steps")
    p.add_argument("--timesteps", type=_timesteps_arg, help="explicit timesteps, e.g. 1000,750,500,250")
    p.add_argument("--guidance", type=float, help="CFG scale (1 = no CFG, one forward per step)")
    p.add_argument("--guidance-low", type=float, help="CFG scale of the low-noise expert (Wan 2.2 A14B)")
    p.add_argument("--shift", type=float, help="flow shift")
    p.add_argument("--seed", type=int, help="story seed; clip seeds derive from it")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--fps", type=int)
    p.add_argument("--negative-prompt")
    p.add_argument("--lora", action="append", type=_lora_arg, default=[], metavar="FILE[:WEIGHT[:EXPERT]]",
                   help="add a LoRA (repeatable); EXPERT is both, high or low")
    p.add_argument("--family", help="family of the original-format files in --model: wan21-i2v-14b-480p, "
                   "wan21-i2v-14b-720p, wan21-flf2v-14b-720p, wan22-i2v-a14b, wan22-ti2v-5b or a family JSON (`cliploom inspect DIR` names it)")
    p.add_argument("--no-fuse", dest="fuse_loras", action="store_const", const=False,
                   help="keep LoRAs as switchable adapters (allows per-clip weights; slower)")
    p.add_argument("--no-svi-lora", dest="svi_lora", action="store_const", const=False,
                   help="do not apply the model's own SVI LoRA (the built-in model ships one)")
    p.add_argument("--offload", choices=("none", "model", "group", "sequential"),
                   help="move model parts to the CPU between uses (small GPUs)")
    p.add_argument("--vae-tiling", action="store_const", const=True, help="decode the VAE in tiles")
    p.add_argument("--release-text-encoder", action="store_const", const=True,
                   help="free the text encoder once the prompts are encoded")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--weights", choices=("bf16", "fp16", "fp32", "fp8"),
                   help="how the transformer weights are stored (fp8: half of bf16's memory, computed in bf16)")
    p.add_argument("--attention", help="attention backend: auto (default), sdpa, flash, flash3, sage, xformers, flex, ...")
    p.add_argument("--compile", action="store_const", const=True, help="torch.compile the repeated transformer blocks")
    p.add_argument("--fp8-matmul", action="store_const", const=True,
                   help="fp8 matmuls through torchao (CUDA GPUs with fp8 tensor cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (and start its run afresh)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue an interrupted run after its last finished clip (checkpoints in OUT.run/)")
    again.add_argument("--from-clip", type=int, metavar="N",
                       help="keep clips 0..N-1 of a finished run byte for byte, generate clip N on from the story")
    p.add_argument("--end-frame", action="append", default=[], metavar="CLIP:IMAGE",
                   help="clip CLIP (numbered from 0, as in the report) ends on IMAGE (repeatable)")
    p.add_argument("--route", help="how the past enters a clip: svi (default), df (diffusion forcing) causal (KV cache), self-forcing (the causal loop with self-forcing weights) or helios (compressed multi-term history); docs/routes.md")
    p.add_argument("--route-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a route option, e.g. addnoise=20 (repeatable; on top of the story's route_options)")
    p.add_argument("--parallel", metavar="SPEC",
                   help="under torchrun: ulysses=N (sequence parallel) or cfg=2 (docs/scale.md)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_generate)


def _story_from_args(args):
    from .story import cycle_prompts, load_story, make_story, story_from_dict

    overrides = {
        "model": args.model,
        "mode": args.mode,
        "frames": args.frames,
        "motion_latents": args.motion_latents,
        "motion_frames": args.motion_frames,
        "ref_pad": args.ref_pad,
        "steps": args.steps,
        "timesteps": args.timesteps,
        "guidance": args.guidance,
        "guidance_low": args.guidance_low,
        "shift": args.shift,
        "seed": args.seed,
        "width": args.width,
        "height": args.height,
        "fps": args.fps,
        "negative_prompt": args.negative_prompt,
        "fuse_loras": args.fuse_loras,
        "svi_lora": args.svi_lora,
        "offload": args.offload,
        "vae_tiling": args.vae_tiling,
        "release_text_encoder": args.release_text_encoder,
        "weights": args.weights,
        "attention": args.attention,
        "compile": args.compile,
        "fp8_matmul": args.fp8_matmul,
        "route": args.route,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    route_options = _route_options(args.route_opt)
    if args.story:
        if args.prompt or args.image or args.clips:
            raise CliploomError("give either a story file or --image/--prompt/--clips, not both", "drop one of them")
        story = load_story(args.story)
        values = {**story.__dict__, **overrides}
        if args.steps is not None:
            values["timesteps"] = None
        if args.timesteps is not None:
            values["steps"] = None
        if args.mode is not None and args.mode != story.mode:  # the new mode's preset applies
            values["motion_frames"], values["ref_pad"] = args.motion_frames, args.ref_pad
        values["loras"] = story.loras + args.lora
        values["clips"] = _with_end_frames(story.clips, args.end_frame)
        values["route_options"] = {**story.route_options, **route_options}
        return make_story(**values)
    if not args.image:
        raise CliploomError("no story file and no --image", "pass STORY.yaml, or --image IMG --prompt TEXT")
    clips = _with_end_frames(cycle_prompts(args.prompt, args.clips), args.end_frame)
    story = make_story(clips=clips, route_options=route_options, **overrides)
    story.reference = Path(args.image).expanduser()
    story.loras = args.lora
    return story


def _route_options(specs: list[str]) -> dict:
    from .routes import parse_option

    out = {}
    for spec in specs:
        try:
            key, value = parse_option(spec)
        except Exception as e:  # a malformed pair, or a value YAML cannot read
            raise CliploomError(f"--route-opt {spec!r} is not KEY=VALUE", "write e.g. --route-opt addnoise=20") from e
        out[key] = value
    return out


def _with_end_frames(clips, specs: list[str]):
    """``--end-frame CLIP:IMAGE`` on top of the story's clips (CLIP numbered from 0)."""
    import dataclasses

    from .story import Keyframe

    clips = list(clips)
    for spec in specs:
        index, sep, image = spec.partition(":")
        if not sep or not index.strip().isdigit() or not image:
            raise CliploomError(f"--end-frame {spec!r} is not CLIP:IMAGE", "write e.g. --end-frame 2:end.png (clips from 0)")
        i = int(index)
        if i >= len(clips):
            raise CliploomError(f"--end-frame {spec!r}: the story has clips 0..{len(clips) - 1}", "number clips from 0")
        keys = [k for k in clips[i].keyframes if k.frame != -1] + [Keyframe(-1, Path(image).expanduser())]
        clips[i] = dataclasses.replace(clips[i], keyframes=tuple(keys))
    return clips


def cmd_generate(args) -> int:
    from .engine import Engine

    story = _story_from_args(args)
    if story.reference is None:
        raise CliploomError(f"{story.source}: no reference image", "add `reference: image.png` to the story")
    from .video_io import check_output, load_image

    out = args.out or f"out/{story.source.stem if story.source else 'cliploom'}.mp4"
    load_image(story.reference)  # fail on bad input before loading the model
    for i, clip in enumerate(story.clips):
        for k in clip.keyframes:
            load_image(k.image, what=f"clip {i} keyframe image")
    again = args.resume or args.from_clip is not None
    check_output(out, args.overwrite or again)
    device, split = args.device, None
    if args.parallel:
        from . import parallel

        split = parallel.parse(args.parallel)
        if again:
            raise CliploomError("--resume and --from-clip do not run under --parallel yet", "resume in one process")
        device = str(parallel.init(split))
    engine = Engine.load(story.model, device=device, family=args.family, offload=story.offload, weights=story.weights)
    if split is not None:
        parallel.enable(engine.model, split)
        if parallel.rank() != 0:  # every rank runs the loop on the same inputs; rank 0 writes and speaks
            logging.getLogger("cliploom").setLevel(logging.ERROR)
            for _ in engine.generate(story, progress=False):
                pass
            return 0
    try:
        report = engine.render(story, out, progress=not args.quiet, overwrite=args.overwrite, resume=args.resume,
                               from_clip=args.from_clip)
    except KeyboardInterrupt:
        import signal

        from .runs import Run, run_folder_for

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        done = len(Run(run_folder_for(out)).saved())
        print(f"interrupted: {out} was not written; {done} finished clip(s) are kept in {run_folder_for(out)}, "
              "continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    t = report["totals"]
    kept = f" (clips 0..{report['resumed_at_clip'] - 1} kept from the run)" if report.get("resumed_at_clip") else ""
    print(
        f"wrote {out}: {t['clips']} clips{kept}, {t['frames']} frames, {t['video_seconds']:.1f} s of video "
        f"in {t['seconds']:.1f} s (time-to-video {t['time_to_video']:.2f}); report {report['report_path']}"
    )
    return 0


def _add_make_tiny(sub) -> None:
    from .models.tiny import EXTRA_VARIANTS, VARIANTS

    p = sub.add_parser("make-tiny", help="write a random-weight tiny Wan model (diffusers layout)")
    p.add_argument("dir", help="output folder")
    p.add_argument("--variant", default="wan21", choices=VARIANTS + EXTRA_VARIANTS, help="model family to imitate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_make_tiny)


def cmd_make_tiny(args) -> int:
    from .inputs import check_writable
    from .models.tiny import make_tiny

    out = Path(args.dir)
    if out.exists() and not out.is_dir():
        raise CliploomError(f"{out} exists and is not a folder", "choose another folder for the model")
    check_writable(out.parent if str(out.parent) else Path("."), "choose a writable folder for the model")
    path = make_tiny(args.dir, args.variant, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote tiny {args.variant} model to {path}")
    return 0


def _add_shapesworld(sub) -> None:
    p = sub.add_parser("shapesworld", help="the procedural world the built-in model was trained on")
    ss = p.add_subparsers(dest="shapesworld_command", required=True)
    v = ss.add_parser("vocab", help="print the prompt grammar's words as JSON")
    v.set_defaults(func=cmd_shapesworld_vocab)
    r = ss.add_parser("render", help="draw the reference frame of a prompt")
    r.add_argument("prompt", help='e.g. "a red circle moves left on a navy background"')
    r.add_argument("-o", "--out", required=True, help="output PNG")
    r.add_argument("--size", type=int, default=32, help="frame size in pixels (default 32)")
    r.add_argument("--seed", type=int, help="random placement (default: canonical placement)")
    r.set_defaults(func=cmd_shapesworld_render)


def cmd_shapesworld_vocab(args) -> int:
    import json

    from .shapesworld import vocab

    print(json.dumps(vocab(), indent=2))
    return 0


def cmd_shapesworld_render(args) -> int:
    from PIL import Image

    from .shapesworld import render_reference

    from .inputs import check_output_file

    if not 8 <= args.size <= 4096:
        raise CliploomError(f"--size {args.size} must be between 8 and 4096", "use e.g. 32")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        raise CliploomError(f"--seed {args.seed} must be in 0..2**32-1", "use e.g. --seed 7")
    out = check_output_file(args.out, "image output", (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
    try:
        image = render_reference(args.prompt, size=args.size, seed=args.seed)
    except ValueError as e:
        raise CliploomError(str(e).splitlines()[0], "run `cliploom shapesworld vocab` for the valid words") from None
    tmp = out.with_name(f".{out.name}.partial")
    image.save(tmp, format=Image.registered_extensions()[out.suffix.lower()])
    tmp.replace(out)
    print(f"wrote {out} ({args.size}x{args.size})")
    return 0


# Sub-commands that live beside what they drive: each module has ``add_command(subparsers)``,
# which registers its parser and sets ``func``.
COMMAND_MODULES: tuple[str, ...] = (
    "cliploom.eval_cli",
    "cliploom.train.cli",
    "cliploom.models.inspect",
    "cliploom.models.convert",
    "cliploom.serve",
)


class _Parser(argparse.ArgumentParser):
    """Usage errors in the one-line form every other error has (not argparse's usage block)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from . import __version__

    parser = _Parser(prog="cliploom", description="Long video generation by SVI clip stitching.")
    parser.add_argument("--version", action="version", version=f"cliploom {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_make_tiny(sub)
    _add_shapesworld(sub)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        _quiet_libraries()
        from .models.formats import console_logging

        # the loaders' one-line reports (LoRAs applied, keys not applied) on stderr; -q: warnings only
        console_logging(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
        return args.func(args) or 0
    except CliploomError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the goodbye
        print("interrupted: nothing that looks finished was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:  # the machine said no: disk full, read-only, permissions, a vanished file
        where = f" {e.filename}" if getattr(e, "filename", None) else " the output"
        print(f"error: cannot write{where}: {e.strerror or e}; check free space and permissions", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError:
        print("error: out of memory; use fewer frames, a smaller size or --offload", file=sys.stderr)
        return EXIT_USAGE


def _quiet_libraries() -> None:
    """Library chatter (weight-loading bars, deprecation notes) is noise for CLI users."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    logging.getLogger("transformers").setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
