"""What a keyframe's latent says about the end of a clip, through the built-in causal VAE.

    python benchmarks/keyframe_latents.py [--model DIR] [--sequences 24]

For N ShapesWorld clips of 17 frames (the second segment of a two-segment sequence), compares
the clip's own last latent (frames 13-16 encoded deep in the clip) with three encodings of its
last frame alone: the image as a single-frame latent (what `y` gets for an `end_frame`), the image
held still over 5 frames (latent 1), and grey frames then the image (diffusers' FLF2V conditioning
video, last latent); relative L2 difference, beside the last latents of unrelated clips. Then
decodes the clip's latents with the last one replaced by each encoding and measures where the
decoded last frame puts the subject (ShapesWorld segmentation) against the true last frame: how
well the end of a clip can be dictated by writing its last latent, given the clip's true frames
before it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def measure(model, sequences: int) -> dict:
    import torch

    from bench_keyframes import measure as subject_centre
    from cliploom.models.components import frames_to_tensor
    from cliploom.shapesworld import sample_sequence

    names = ("single_frame", "held_5_frames", "grey_then_image")
    latent_gap = {n: [] for n in names + ("unrelated_clip",)}
    decoded_px = {n: [] for n in ("own_latent",) + names}
    with torch.no_grad():
        for s in range(sequences):
            seq = sample_sequence(s, 2, 17, size=model.settings.width)
            clip, prompt = seq.frames(17, 34), seq.prompts[1]
            latents = model.encode_video(frames_to_tensor(clip))
            own = latents[:, :, -1:]
            end = clip[-1:]
            encodings = {
                "single_frame": model.encode_video(frames_to_tensor(end)),
                "held_5_frames": model.encode_video(frames_to_tensor(np.repeat(end, 5, 0)))[:, :, 1:2],
                "grey_then_image": model.encode_video(
                    frames_to_tensor(np.concatenate([np.full_like(clip[:-1], 127), end])))[:, :, -1:],
            }
            other = sample_sequence(s + 100, 1, 17, size=model.settings.width).frames(0, 17)
            encodings_gap = dict(encodings, unrelated_clip=model.encode_video(frames_to_tensor(other))[:, :, -1:])
            for name, lat in encodings_gap.items():
                latent_gap[name].append(float((lat - own).norm() / own.norm()))
            want = subject_centre(end[0], prompt)[0]
            for name, lat in dict(own_latent=own, **encodings).items():
                written = latents.clone()
                written[:, :, -1:] = lat
                got = subject_centre(model.decode_latents(written)[-1].numpy(), prompt)[0]
                decoded_px[name].append(float(np.linalg.norm(got - want)))
    return {
        "sequences": sequences,
        "relative_latent_difference": {k: round(float(np.mean(v)), 3) for k, v in latent_gap.items()},
        "decoded_end_median_px": {k: round(float(np.median(v)), 2) for k, v in decoded_px.items()},
        "decoded_end_within_2px": {k: round(float(np.mean(np.array(v) <= 2)), 3) for k, v in decoded_px.items()},
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the built-in model)")
    ap.add_argument("--sequences", type=int, default=24)
    args = ap.parse_args(argv)

    import json

    import torch

    torch.set_num_threads(int(os.environ.get("CLIPLOOM_THREADS", "2")))
    from cliploom.models import load_model
    from cliploom.shapesworld.build_model import MODEL_DIR

    r = measure(load_model(args.model or MODEL_DIR, device="cpu"), args.sequences)
    print(json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    main()
