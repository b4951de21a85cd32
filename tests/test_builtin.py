"""The shipped ShapesWorld model: loads offline, generates a clip the evaluator recognises."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cliploom.models.builtin import SHIPPED


def test_model_is_shipped_and_small():
    assert (SHIPPED / "model_index.json").is_file(), "the built-in model folder is missing from the package"
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    # the DiT, VAE and text encoder (26 MB) and the routes' LoRAs (3-6 MB each; issue 17 allows 10 MB a route)
    assert size <= 45e6, f"the built-in model is {size / 1e6:.1f} MB (limit 45 MB)"
    settings = json.loads((SHIPPED / "cliploom.json").read_text())
    assert settings["frames"] == 17 and settings["width"] == 32 == settings["height"]
    assert not list(SHIPPED.rglob("*.bin")) and not list(SHIPPED.rglob("*.pt")), "weights must be safetensors"


@pytest.fixture(scope="module")
def engine():
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be fetched: a hub call would fail loudly
    import cliploom

    return cliploom.Engine.load("builtin", device="cpu")


@pytest.mark.parametrize("mode", ["pro", "chain"])
def test_builtin_clip_has_the_prompted_subject(engine, tmp_path, mode):
    import cliploom
    from cliploom.evaluate import evaluate_video
    from cliploom.shapesworld import render_reference

    prompt = "a big yellow square moves left on a navy background"
    ref = tmp_path / "ref.png"
    render_reference(prompt).save(ref)
    story = cliploom.make_story(clips=[cliploom.story.ClipSpec(prompt)] * 2, reference=ref, mode=mode, seed=3)
    clips = list(engine.generate(story, progress=False))
    frames = np.concatenate([c.frames.numpy() for c in clips])
    assert frames.shape[1:] == (32, 32, 3)
    result = evaluate_video(frames, prompts=[prompt] * 2, clip_lengths=[len(c.frames) for c in clips])
    first = result["clips"][0]
    assert first["area_status"] == "kept", first
    assert first["color_delta_e"] is not None and first["color_delta_e"] < 15, first


def test_build_model_writes_the_shipped_settings():
    """Rebuilding the built-in folder (docs/shapesworld.md) gives the cliploom.json that ships: its
    defaults, the SVI LoRA, the keyframe LoRA and the route LoRAs under the names build_model gives them,
    and the option defaults it writes for those routes."""
    import json

    from cliploom.models.builtin import SHIPPED
    from cliploom.shapesworld.build_model import DEFAULTS, ROUTE_OPTIONS

    shipped = json.loads((SHIPPED / "cliploom.json").read_text())
    routes = shipped.get("route_loras", {})
    assert routes == {r: f"{r}_lora.safetensors" for r in routes}
    assert all((SHIPPED / name).is_file() for name in routes.values())
    assert (SHIPPED / shipped["keyframe_lora"]).is_file()
    options = {r: ROUTE_OPTIONS[r] for r in routes if r in ROUTE_OPTIONS}  # the shipped weights' option defaults
    assert {**DEFAULTS, "svi_lora": "svi_lora.safetensors", "keyframe_lora": "keyframe_lora.safetensors",
            **({"route_loras": routes} if routes else {}), **({"route_options": options} if options else {})} == shipped
