"""Long-video routes: how the memory of the past enters a clip (``route:`` in a story).

* ``svi`` (default): the anchor and the previous clip's last K latents in ``y`` (SVI 2.0 Pro; the
  clip loop of :mod:`cliploom.loom` with any motion mode).
* ``df``: diffusion forcing (SkyReels-V2 DF): the same latents given as context frames of the noisy
  latents, clean or lightly noised (``addnoise``, a timestep), with their own per-token timesteps
  (:func:`cliploom.conditioning.context_condition`); the ``pro`` timeline, so every route is scored
  on the same frames.
* ``causal``: a causal model with a rolling KV cache (CausVid, Self-Forcing, LongLive): latent
  frames made block by block, each attending to the cached keys and values of a sink (the first
  clips) and a window (the last clips) (:mod:`cliploom.routes.causal`, :mod:`cliploom.models.causal`).
* ``self-forcing``: the same loop with weights trained on their own rollouts (DMD against the
  bidirectional teacher, :mod:`cliploom.train.self_forcing`), sampled as distilled: few steps, no
  guidance (``SAMPLING``) unless the story says otherwise.
* ``helios``: Helios' multi-term history: the anchor and the last latents as extra tokens at full
  resolution, older latents compressed by the Helios patch layers, at fixed positions, timestep 0,
  no cross-attention (:mod:`cliploom.routes.helios`, :mod:`cliploom.models.helios`).

A route's options live in ``route_options:`` (CLI ``--route-opt KEY=VALUE``), each with a type, a
range and a default, checked before anything loads. Routes named by the long-video literature that
this version does not run yet (``PLANNED``) are refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    kind: type
    low: float
    high: float
    default: object
    help: str
    choices: tuple = ()  # the values a str option takes


CAUSAL_OPTIONS = {
    "block": Option(int, 1, 4, 1, "latent frames denoised together (4 video frames each)"),
    "sink": Option(int, 0, 8, 1, "clips at the start of the video kept in the KV cache"),
    "window": Option(int, 1, 16, 2, "most recent clips kept in the KV cache"),
    "recache": Option(bool, 0, 1, False, "at a prompt switch, recompute the cache under the new prompt (LongLive)"),
    "rope_jitter": Option(float, 0.0, 1.0, 0.0, "LoL: spread the heads' temporal RoPE frequencies by this much"),
    "positions": Option(str, 0, 0, "absolute", "absolute: every latent frame at its place in the stream; rebased: "
                        "the cache re-laid from position 0 at each clip, so positions stay within sink + window + a clip",
                        ("absolute", "rebased")),
}

ROUTES: dict[str, dict[str, Option]] = {
    "svi": {},
    "df": {
        "addnoise": Option(int, 0, 999, 0, "timestep the context latents are noised to (SkyReels' addnoise_condition)"),
        "ar_step": Option(int, 0, 10, 0, "steps each latent frame starts after the one before it (SkyReels' "
                          "asynchronous diffusion forcing; 0: all frames together)"),
    },
    "causal": CAUSAL_OPTIONS,
    "self-forcing": CAUSAL_OPTIONS,
    # history sizes in latent frames, newest first; the past kept is their sum (memory is bounded)
    "helios": {
        "short": Option(int, 0, 8, 2, "newest latent frames at full resolution (1x2x2 patches), after the anchor"),
        "mid": Option(int, 0, 16, 2, "the latent frames before those, compressed 2x4x4 (patch_mid)"),
        "long": Option(int, 0, 32, 4, "the oldest latent frames kept, compressed 4x8x8 (patch_long)"),
        "stages": Option(int, 0, 3, 0, "pyramid stages (Helios' HeliosPyramidPipeline: the chunk denoised at 1/4, "
                         "1/2 then full resolution); 0: the model's own (a Helios folder's scheduler, else 1)"),
        "amplify_first": Option(bool, 0, 1, False, "a distilled Helios folder (HeliosDMDScheduler): the first clip "
                                "with twice the DMD steps per stage (the pipeline's is_amplify_first_chunk)"),
    },
}
PLANNED: tuple[str, ...] = ()
# Sampling settings a route's weights are made for, used where the story does not set them: the
# Self-Forcing student is distilled to a few steps without guidance (its teacher's guidance is
# baked in by DMD), as the public Self-Forcing / LongLive checkpoints run.
SAMPLING: dict[str, dict[str, object]] = {
    # renoise measured ahead of Euler for the shipped student (docs/routes.md, "Samplers")
    "self-forcing": {"steps": 4, "guidance": 1.0, "guidance_low": 1.0, "sampler": "renoise"},
}
CAUSAL_ROUTES = ("causal", "self-forcing")  # the routes run by the causal loop (a rolling KV cache)


def route_error(route: str) -> tuple[str, str] | None:
    """``(problem, fix)`` for a route this version cannot run, else ``None``."""
    if route in ROUTES:
        return None
    if route in PLANNED:
        return (f"route {route!r} is not available in this version of cliploom",
                f"use one of {', '.join(ROUTES)}")
    return f"unknown route {route!r}", f"use one of {', '.join(ROUTES)}"


def option_error(route: str, key: str, value) -> tuple[str, str] | None:
    """``(problem, fix)`` for an option ``route`` does not take or a value out of its range."""
    options = ROUTES[route]
    if key not in options:
        takes = ", ".join(options) if options else "no options"
        return f"route {route} has no option {key!r}", f"it takes {takes}"
    opt = options[key]
    if opt.kind is str:
        return None if value in opt.choices else (f"route option {key} must be one of {', '.join(opt.choices)}, got {value!r}",
                                                  f"write {key}: {opt.choices[0]}")
    if opt.kind is bool:
        return None if isinstance(value, bool) else (f"route option {key} must be true or false, got {value!r}",
                                                      f"write {key}: true")
    if opt.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        return f"route option {key} must be a whole number, got {value!r}", f"use {opt.low}..{opt.high}"
    if opt.kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"route option {key} must be a number, got {value!r}", f"use {opt.low}..{opt.high}"
    if not opt.low <= value <= opt.high:
        return f"route option {key} {value} is out of range", f"use {opt.low}..{opt.high} ({opt.help})"
    return None


def parse_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` from the command line; the value as YAML reads it (``20`` is a number)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--route-opt {text!r} is not KEY=VALUE")
    return key.strip(), yaml.safe_load(value)


def weave_for(route: str):
    """The clip loop of ``route``: ``weave(model, story, **options) -> Iterator[Clip]``."""
    if route in CAUSAL_ROUTES:
        from .causal import weave
    elif route == "helios":
        from .helios import weave
    else:  # svi and df share the clip loop; they differ in how a clip is conditioned
        from ..loom import weave
    return weave
