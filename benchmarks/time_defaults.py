"""Seconds per clip of the built-in model's defaults against each of them turned back, on dev story 0
(20 clips; the median of ROUNDS interleaved timings each): which part of the defaults of 2026-12-03
costs the time, and what merging the LoRA stack after the image-to-video clip 0 gives back.

    python benchmarks/time_defaults.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402

ROUNDS = 3
RUNS = {  # story keys over the model's defaults ("merge": False turns LoraStack.merge off)
    "defaults": {},
    "defaults, the stack unfused all story (as before merging after clip 0)": {"merge": False},
    "anchor reference": {"anchor": "reference"},
    "first_clip pro (stack fused)": {"first_clip": "pro"},
    "anchor reference + first_clip pro (v2's defaults)": {"anchor": "reference", "first_clip": "pro"},
}


def main() -> None:
    import torch

    from cliploom.engine import Engine
    from cliploom.story import ClipSpec, make_story

    torch.set_num_threads(2)
    seconds = {name: [] for name in RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(ROUNDS):  # interleaved, so a slow spell of the machine touches every run alike
            for name, keys in RUNS.items():
                engine = Engine.load("builtin")  # a fresh engine each: a fused stack stays fused
                keys = dict(keys)
                if not keys.pop("merge", True):  # LoraStack.merge off: the adapters applied at every call
                    engine.loras.merge = lambda: False
                dev = bq.dev_set(1, 20, engine.model.settings.frames)[0]
                ref = Path(tmp) / "reference.png"
                dev.reference(engine.model.settings.width).save(ref)
                story = make_story(clips=[ClipSpec(p) for p in dev.prompts], reference=ref, seed=dev.seed, **keys)
                started, first = time.perf_counter(), None
                for _ in engine.generate(story, progress=False):
                    first = first if first is not None else time.perf_counter() - started
                seconds[name].append((first, (time.perf_counter() - started) / len(dev.prompts)))
    for name, runs in seconds.items():
        firsts, per_clip = sorted(r[0] for r in runs), sorted(r[1] for r in runs)
        print(f"{name}: first clip {firsts[len(runs) // 2]:.2f} s, {per_clip[len(runs) // 2]:.3f} s / clip "
              f"(range {per_clip[0]:.3f}-{per_clip[-1]:.3f})", flush=True)

if __name__ == "__main__":
    main()
