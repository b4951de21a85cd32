"""Memory against clip index in one long run of a route (issue 17: memory that stays flat however
long the video gets): every EVERY clips, the process's RSS, its peak so far, and the tensors alive
(count and MiB of their storages, after a garbage collection) -- the last is what a route keeps, free
of the allocator's noise, which at the built-in model's size (about 50 MiB of tensors in a 500 MiB
process) moves the RSS by tens of MiB from run to run.

    python benchmarks/memory_curve.py [--runs helios,causal] [--clips 60] [--every 5]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402
import bench_routes as br  # noqa: E402


def live_tensors() -> tuple[int, float]:
    """Tensors reachable by the garbage collector: their count and the MiB of their storages, each
    storage once (views share one)."""
    import torch

    gc.collect()
    count, storages = 0, {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor):
                count += 1
                storage = obj.untyped_storage()
                storages[(storage.device.type, storage.data_ptr())] = storage.nbytes()
        except Exception:  # a tensor without storage (meta, some subclasses): not memory
            continue
    return count, sum(storages.values()) / 2**20


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="helios,causal")
    ap.add_argument("--clips", type=int, default=60)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--json", help="also write the curves to this file")
    args = ap.parse_args(argv)
    from cliploom.engine import Engine

    br.setup_torch()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for text in args.runs.split(","):
            run = br.parse_run(text)
            engine = Engine.load(args.model)
            dev = bq.dev_set(1, args.clips, engine.model.settings.frames)[0]
            ref = Path(tmp) / "reference.png"
            dev.reference(engine.model.settings.width).save(ref)
            br.reset_peak_rss()
            rows = []
            for i, _ in enumerate(br.route_clips(engine, dev, run, {}, ref, 0)):
                if (i + 1) % args.every == 0:
                    count, mib = live_tensors()
                    rows.append({"clips": i + 1, "rss_mib": round(br.rss_mib("VmRSS"), 1),
                                 "peak_mib": round(br.rss_mib("VmHWM"), 1), "tensors": count,
                                 "tensor_mib": round(mib, 2)})
                    print(f"{run.name} clip {i + 1}: RSS {rows[-1]['rss_mib']:.0f} MiB, peak {rows[-1]['peak_mib']:.0f}, "
                          f"{count} tensors alive, {mib:.2f} MiB", flush=True)
            out[run.name] = rows
            del engine
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
