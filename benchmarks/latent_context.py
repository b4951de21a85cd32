"""How much a causal VAE's latent of the same four frames depends on where in a clip they sit.

    python benchmarks/latent_context.py [--model DIR] [--sequences 8]

SVI 2.0 Pro hands the previous clip's *last* latent to the next clip, where the model reads it at
position 1. For each of N ShapesWorld sequences this encodes frames 0-32 as one clip (frames 13-16
become latent 4: deep in the clip, as inference hands it on) and frames 12-28 as another (frames
13-16 become latent 1: right after a first frame, as a trainer that takes a clip's own latent 1
shows it), and prints the relative difference ||deep - shallow|| / ||shallow||, beside the same
measure between latent 1 of two unrelated clips (the scale of "nothing in common").
"""

from __future__ import annotations

import argparse
import os

import numpy as np


def measure(model, sequences: int) -> dict:
    from cliploom.models.components import frames_to_tensor
    from cliploom.shapesworld import sample_sequence

    same, unrelated = [], []
    for s in range(sequences):
        frames = sample_sequence(s, 2, [17, 16], size=model.settings.width).frames()
        deep = model.encode_video(frames_to_tensor(frames[:33]))[:, :, 4]
        shallow = model.encode_video(frames_to_tensor(frames[12:29]))[:, :, 1]
        other_frames = sample_sequence(s + 100, 2, [17, 16], size=model.settings.width).frames()
        other = model.encode_video(frames_to_tensor(other_frames[12:29]))[:, :, 1]
        same.append(float((deep - shallow).norm() / shallow.norm()))
        unrelated.append(float((other - shallow).norm() / shallow.norm()))
    return {"sequences": sequences, "deep_vs_shallow": round(float(np.mean(same)), 3),
            "unrelated_clips": round(float(np.mean(unrelated)), 3), "per_sequence": [round(v, 3) for v in same]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the built-in model)")
    ap.add_argument("--sequences", type=int, default=8)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(int(os.environ.get("CLIPLOOM_THREADS", "2")))
    from cliploom.models import load_model
    from cliploom.shapesworld.build_model import MODEL_DIR

    r = measure(load_model(args.model or MODEL_DIR, device="cpu"), args.sequences)
    print(f"same frames, deep vs shallow latent: {r['deep_vs_shallow']:.3f} relative difference "
          f"(unrelated clips: {r['unrelated_clips']:.3f}) over {r['sequences']} sequences")
    return r


if __name__ == "__main__":
    main()
