"""The weights shipped with the built-in model are the ones their recipes train.

A test once wrote its own 2-step, rank-4 Helios LoRA through a symlink onto the shipped
``helios_lora.safetensors``, and that file was committed: every later measurement of the helios route
ran on it. Each shipped LoRA names its training in its metadata (``cliploom_info``: route, last step;
``rank``), so each is checked against the committed recipe docs/shapesworld.md names for it. The check
tells a shipped file from a test's or another route's, not two runs of one route with the same rank, steps
and targets (the Self-Forcing++ arms and their twins): those differ only in what they were trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from cliploom.models.builtin import SHIPPED

ROOT = Path(__file__).resolve().parents[1]

# shipped file -> the config whose run it is the bf16 export of (docs/shapesworld.md, docs/routes.md)
RECIPES = {
    "svi_lora.safetensors": "configs/svi-shapesworld-boundary1.yaml",
    "keyframe_lora.safetensors": "configs/svi-shapesworld-keyframes-stage5.yaml",
    "df_lora.safetensors": "configs/df-shapesworld.yaml",
    "causal_lora.safetensors": "configs/causal-shapesworld.yaml",
    "self-forcing_lora.safetensors": "configs/self-forcing-plusplus.yaml",
    "helios_lora.safetensors": "configs/helios-shapesworld.yaml",
}


def _shipped_names() -> set[str]:
    meta = json.loads((SHIPPED / "cliploom.json").read_text())
    names = {meta["svi_lora"], meta["keyframe_lora"], *meta["route_loras"].values()}
    return names


def test_every_shipped_lora_has_a_recipe():
    assert _shipped_names() == set(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_shipped_lora_is_its_recipes_final_export(name):
    cfg = yaml.safe_load((ROOT / RECIPES[name]).read_text())
    with safe_open(str(SHIPPED / name), "pt") as f:
        meta = f.metadata() or {}
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    info = json.loads(meta["cliploom_info"])
    assert info["step"] == cfg["steps"], (name, info["step"], cfg["steps"])
    assert int(meta["rank"]) == cfg["rank"], (name, meta["rank"], cfg["rank"])
    assert meta.get("cliploom_route", "svi") == cfg.get("route", "svi")
    assert dtypes == {"BF16"}, (name, dtypes)
    assert info["targets"] == cfg["targets"], (name, info["targets"])
    assert info["error_recycling"] == bool(cfg.get("error_recycling", True)), name  # the trainer's default: on
