"""Average several LoRAs of one model (a "soup"): the file written applies the mean of their weight
updates, exactly, by stacking their ranks (rank = the sum of theirs).

    python benchmarks/lora_soup.py OUT.safetensors A.safetensors B.safetensors [...] [--layout svi]

The inputs may be in any layout cliploom reads (each file's alpha / rank scale is taken into its
pairs); they must adapt the same modules with low-rank pairs only. How issue 12 tested whether
averaging two stage seeds of v5's recipe beats either (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def soup(files: list[Path]) -> tuple[dict[str, torch.Tensor], int]:
    """The stacked pairs (peft names, scale 1) of the mean of ``files``' updates, and their rank."""
    from cliploom.models.formats import read_lora

    loras = [read_lora(f) for f in files]
    for f, lf in zip(files, loras):
        if lf.deltas() or len(lf.ranks) != 1:
            raise SystemExit(f"error: {f} is not a LoRA of low-rank pairs of one rank; average plain LoRA files")
    names = set(loras[0].pairs())
    for f, lf in zip(files[1:], loras[1:]):
        if set(lf.pairs()) != names:
            raise SystemExit(f"error: {f} adapts other modules than {files[0]}; average LoRAs of one recipe")
    states = [lf.peft_state_dict() for lf in loras]  # alpha / rank folded into A: W += B @ A
    out = {}
    for name in sorted(names):
        a, b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        out[a] = torch.cat([s[a] for s in states], 0).contiguous()
        out[b] = torch.cat([s[b] / len(states) for s in states], 1).contiguous()
    return out, sum(lf.ranks[0] for lf in loras)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("loras", type=Path, nargs="+")
    ap.add_argument("--layout", default="svi", choices=("svi", "diffusers"))
    args = ap.parse_args(argv)
    if len(args.loras) < 2:
        ap.error("give at least two LoRAs to average")
    from cliploom.train.export import export_lora

    state, rank = soup(args.loras)
    export_lora(state, args.out, args.layout, rank=rank, alpha=float(rank),  # written atomically
                info={"soup": [str(f) for f in args.loras]})
    print(f"wrote {args.out}: the mean of {len(args.loras)} LoRAs, rank {rank}")


if __name__ == "__main__":
    sys.exit(main())
