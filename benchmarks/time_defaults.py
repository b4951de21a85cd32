"""Seconds per clip of the built-in defaults against each option turned back (dev story 0, 20 clips, one
timing each): which part of the defaults of 2026-12-03 costs the time.  python benchmarks/time_defaults.py"""
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
torch.set_num_threads(2)
import bench_quality as bq
from cliploom.engine import Engine
from cliploom.story import ClipSpec, make_story
eng = Engine.load("builtin")
d = bq.dev_set(1, 20, eng.model.settings.frames)[0]
tmp = Path(tempfile.mkdtemp()); ref = tmp / "r.png"; d.reference(32).save(ref)
for name, kw in [("defaults", {}), ("anchor reference", {"anchor": "reference"}),
                 ("first_clip pro (fused)", {"first_clip": "pro"}),
                 ("reference + pro (v2-like)", {"anchor": "reference", "first_clip": "pro"}), ("defaults again", {})]:
    e = Engine.load("builtin")
    st = make_story(clips=[ClipSpec(p) for p in d.prompts], reference=ref, seed=d.seed, **kw)
    t0 = time.perf_counter(); first = None
    for i, c in enumerate(e.generate(st, progress=False)):
        if i == 0: first = time.perf_counter() - t0
    tot = time.perf_counter() - t0
    print(f"{name}: first clip {first:.2f} s, {tot/20:.3f} s/clip", flush=True)
