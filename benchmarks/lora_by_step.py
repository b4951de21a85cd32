"""The SVI LoRA at another weight on the low-noise steps (as a Wan 2.2 low-noise expert without the
LoRA would run it), measured on the dev set in `pro` mode: how docs/benchmarks.md's row was made.

    python benchmarks/lora_by_step.py 0 0.5 --sample-seed 0     # the LoRA off for sigma < 0.5
    python benchmarks/lora_by_step.py 1 0.5 --sample-seed 0     # the same harness, weight 1 throughout

The first number scales the SVI LoRA's weight on every step whose sigma is below the second (with
8 steps and shift 5 the sigmas are 1, .97, .93, .87, .79, .67, .46, .02: below 0.5 are the last two).
The stack stays unmerged (each step sets its adapter weight), so weight 1 is the reference run on
the same path. The rest is `quality_sweep.py` with the built-in model's defaults (its line is printed;
``--json FILE`` keeps the per-clip records).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def patch(low: float, below: float, setattr=setattr) -> None:
    """Make every clip's denoiser set the SVI LoRA's weight per step: the clip's own weight (0 on an
    i2v clip 0) times ``low`` where sigma < ``below``. ``setattr``: pytest's ``monkeypatch.setattr``
    in a test, so that the patch is undone."""
    import cliploom.loom as loom
    from cliploom.models.lora import LoraStack

    state: dict = {"stack": None, "weight": 1.0}
    set_weights, init = LoraStack.set_clip_weights, LoraStack.__init__

    def remember_stack(self, *a, **k):
        init(self, *a, **k)
        state["stack"] = self

    def remember_weight(self, weights):  # the engine's per-clip call
        state["weight"] = (weights or {}).get("svi", 1.0)
        set_weights(self, weights)

    make = loom.make_denoiser

    def make_by_step(*a, **k):
        denoise = make(*a, **k)

        def by_step(x, sigma):
            s = float(sigma.max()) if hasattr(sigma, "max") else float(sigma)
            set_weights(state["stack"], {"svi": state["weight"] * (low if s < below else 1.0)})
            return denoise(x, sigma)

        return by_step

    setattr(LoraStack, "__init__", remember_stack)
    setattr(LoraStack, "set_clip_weights", remember_weight)
    setattr(LoraStack, "merge", lambda self: False)  # keep the adapters switchable
    setattr(loom, "make_denoiser", make_by_step)


if __name__ == "__main__":
    low, below = float(sys.argv[1]), float(sys.argv[2])
    patch(low, below)
    import quality_sweep

    quality_sweep.main(["{}"] + sys.argv[3:])
