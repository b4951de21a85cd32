"""``cliploom train-svi`` and ``cliploom export-lora``: argument parsing only."""

from __future__ import annotations


def add_command(sub) -> None:
    p = sub.add_parser(
        "train-svi",
        help="train an SVI LoRA by error-recycling fine-tuning (see docs/training.md)",
        description="Train an SVI LoRA on a Wan image-to-video model with error recycling. All settings live in "
        "CONFIG.yaml (every key and its default: docs/training.md). Multi-GPU: "
        "`accelerate launch -m cliploom.cli train-svi CONFIG.yaml`.",
    )
    p.add_argument("config", help="training config (YAML)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    p.add_argument("--max-steps", type=int, help="stop after this many more steps (checkpointed; resume later)")
    p.add_argument("--steps", type=int, help="override the config's total `steps`")
    p.add_argument("--out-dir", help="override the config's `out_dir`")
    p.add_argument("--seed", type=int, help="override the config's `seed` (another training draw of the same recipe)")
    p.add_argument("--init-lora", help="override the config's `init_lora` (the LoRA a later stage continues)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    e = sub.add_parser(
        "export-lora",
        help="write a trained LoRA checkpoint as one safetensors file (SVI or diffusers layout)",
        description="Export the LoRA of a train-svi checkpoint (or a run folder's latest checkpoint).",
    )
    e.add_argument("checkpoint", help="a run's out_dir or one of its checkpoints/step-N folders")
    e.add_argument("-o", "--out", required=True, help="output .safetensors file")
    e.add_argument("--layout", choices=("svi", "diffusers"), default="svi",
                   help="svi: SVI 2.0 Pro keys (blocks.0.self_attn.q.lora_A.default.weight); "
                   "diffusers: transformer.blocks.0.attn1.to_q.lora_A.weight")
    e.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    e.set_defaults(func=cmd_export)


def cmd_train(args) -> int:
    from pathlib import Path

    from ..errors import CliploomError
    from .config import load_config
    from .loop import train

    if args.max_steps is not None and args.max_steps < 1:
        raise CliploomError(f"--max-steps {args.max_steps} must be at least 1", "pass --max-steps 1 or more")
    cfg = load_config(args.config, steps=args.steps, out_dir=args.out_dir, seed=args.seed, init_lora=args.init_lora)
    from ..inputs import check_writable

    check_writable(Path(cfg.out_dir), "choose a writable out_dir")
    result = train(cfg, resume=args.resume, max_steps=args.max_steps, progress=not args.quiet)
    if not result["main_process"]:
        return 0
    done = "finished" if result["exported"] else "stopped"
    print(f"{done} at step {result['step']}/{cfg.steps} (loss ema {result['loss_ema'] or float('nan'):.4f}, "
          f"{result['seconds']:.0f} s); checkpoint {result['checkpoint']}")
    for path in result["exported"]:
        print(f"wrote {path}")
    return 0


def cmd_export(args) -> int:
    from ..inputs import check_output_file
    from .export import export_checkpoint

    check_output_file(args.out, "LoRA output", (".safetensors",))
    path = export_checkpoint(args.checkpoint, args.out, args.layout, args.dtype)
    print(f"wrote {path} ({args.layout} layout)")
    return 0
