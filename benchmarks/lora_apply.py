"""Seconds to apply a fused LoRA stack: merged directly (cliploom's fused path) against peft's
adapter injection + ``fuse_lora`` + ``unload_lora`` (what the fused path did before, and what
``diffusers`` does), on a freshly loaded engine each time, in one run (the median of ROUNDS
interleaved timings). The cold first frames of a causal route wait for this.

    python benchmarks/lora_apply.py [--model builtin] [--lora causal] [--rounds 5]

``--lora``: a route of the model's ``route_loras``, ``svi``, or a LoRA file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_routes as br  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--lora", default="causal")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    import cliploom.models.lora as lora_module
    from cliploom.engine import Engine
    from cliploom.story import LoraSpec

    br.setup_torch()
    plain = lora_module._plain
    times: dict[str, list[float]] = {"direct": [], "peft": []}
    for _ in range(args.rounds + 1):  # the first round is untimed: the process's first calls
        for path in times:
            engine = Engine.load(args.model)
            settings, folder = engine.model.settings, Path(engine.model.path)
            name = settings.svi_lora if args.lora == "svi" else (settings.route_loras or {}).get(args.lora)
            spec = LoraSpec(folder / name if name else Path(args.lora))
            lora_module._plain = plain if path == "direct" else (lambda layer: False)
            try:
                started = time.perf_counter()
                engine.loras.apply([spec], fuse=True)
                times[path].append(time.perf_counter() - started)
            finally:
                lora_module._plain = plain
    med = {k: sorted(v[1:])[len(v[1:]) // 2] for k, v in times.items()}
    print(f"fused {spec.path.name}: merged directly {med['direct']:.4f} s, through peft {med['peft']:.4f} s "
          f"(median of {args.rounds}; {med['direct'] / med['peft']:.2f}x)")
    return med


if __name__ == "__main__":
    main()
