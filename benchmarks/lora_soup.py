"""Average several LoRAs of one recipe (a "soup"): the file written applies the mean of their weight
deltas, exactly, by stacking their ranks (rank = the sum of theirs).

    python benchmarks/lora_soup.py OUT.safetensors A.safetensors B.safetensors [...]

Every input must be a cliploom export of the same modules with the scale folded into ``lora_B``
(``cliploom export-lora``'s SVI layout, as the trainer writes ``lora_svi.safetensors``); the output
keeps the first file's metadata with the summed rank. How issue 12 tested whether averaging two
stage seeds of v5's recipe beats either (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def soup(files: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The stacked tensors and metadata of the mean of ``files``' deltas."""
    handles = [safe_open(str(f), "pt") for f in files]
    metas = [dict(h.metadata() or {}) for h in handles]
    for f, m in zip(files, metas):
        if m.get("scale_folded_into_lora_B") != "true" or "rank" not in m:
            raise SystemExit(f"error: {f} is not a cliploom LoRA export with its scale folded into lora_B; "
                             "export it with `cliploom export-lora RUN -o FILE --layout svi`")
    keys = set(handles[0].keys())
    for f, h in zip(files[1:], handles[1:]):
        if set(h.keys()) != keys:
            raise SystemExit(f"error: {f} adapts other modules than {files[0]}; average LoRAs of one recipe")
    weight = 1.0 / len(files)
    out: dict[str, torch.Tensor] = {}
    for ka in sorted(k for k in keys if ".lora_A." in k):
        kb = ka.replace(".lora_A.", ".lora_B.")
        a = [h.get_tensor(ka).float() for h in handles]
        b = [h.get_tensor(kb).float() for h in handles]
        out[ka] = torch.cat(a, 0).contiguous()
        out[kb] = torch.cat([weight * x for x in b], 1).contiguous()
    meta = dict(metas[0])
    rank = sum(int(m["rank"]) for m in metas)
    meta["rank"], meta["alpha"] = str(rank), str(float(rank))
    return out, meta


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("loras", type=Path, nargs="+")
    args = ap.parse_args(argv)
    if len(args.loras) < 2:
        ap.error("give at least two LoRAs to average")
    tensors, meta = soup(args.loras)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".part")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(args.out)  # never a half-written file under the final name
    print(f"wrote {args.out}: the mean of {len(args.loras)} LoRAs, rank {meta['rank']}")


if __name__ == "__main__":
    sys.exit(main())
