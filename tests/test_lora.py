"""LoRA stacks on tiny models: every file layout against weights merged by hand, stacking,
experts, fused/unfused, per-clip weights, and every error the issue lists."""

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from cliploom.engine import Engine
from cliploom.errors import CliploomError
from cliploom.models import load_model
from cliploom.story import LoraSpec
from real_layouts import lora_keys

LAYOUTS = ("svi1", "svi2", "diffusers", "comfy", "kohya")
TOL = 1e-4


def fresh(tiny_dirs, variant="wan21"):
    """A model of its own (LoRAs change weights; the session's cached models stay clean)."""
    return load_model(tiny_dirs[variant], device="cpu")


def pair_modules(model) -> list[str]:
    t = model.transformer
    image = t.config.image_dim is not None
    per_block = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                 "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"] + (["attn2.add_k_proj", "attn2.add_v_proj"] if image else [])
    top = ["proj_out", "condition_embedder.time_proj", "condition_embedder.text_embedder.linear_1"]
    top += ["condition_embedder.image_embedder.ff.net.0.proj"] if image else []
    return [f"blocks.{i}.{m}" for i in range(len(t.blocks)) for m in per_block] + top


def build_lora(model, layout, *, rank=4, alpha=None, seed=0, deltas=False, scale_factor=0.3):
    """(tensors in ``layout``, metadata, {diffusers state key: delta at weight 1}) for ``model``'s transformer."""
    g = torch.Generator().manual_seed(seed)
    state = model.transformer.state_dict()
    tensors, expected = {}, {}
    scale = alpha / rank if alpha is not None else 1.0
    for module in pair_modules(model):
        out_f, in_f = state[f"{module}.weight"].shape
        a = torch.randn(rank, in_f, generator=g) * scale_factor / in_f ** 0.5
        b = torch.randn(out_f, rank, generator=g) * scale_factor / rank ** 0.5
        tensors[lora_keys(layout, module, "down")] = a
        tensors[lora_keys(layout, module, "up")] = b
        if alpha is not None and layout != "diffusers":
            tensors[lora_keys(layout, module, "alpha")] = torch.tensor(float(alpha))
        expected[f"{module}.weight"] = scale * (b @ a)
    if deltas:  # ComfyUI/LightX2V full deltas: norms, modulation tables, biases, a whole weight
        targets = []
        for i in range(len(model.transformer.blocks)):
            targets += [(f"blocks.{i}.norm2", "diff", "weight"), (f"blocks.{i}.norm2", "diff_b", "bias"),
                        (f"blocks.{i}.attn1.norm_q", "diff", "weight"), (f"blocks.{i}.scale_shift_table", "diff_m", None),
                        (f"blocks.{i}.attn1.to_q", "diff_b", "bias")]
        targets += [("scale_shift_table", "diff", None), ("condition_embedder.time_embedder.linear_1", "diff", "weight")]
        for module, kind, param in targets:
            key = f"{module}.{param}" if param else module
            d = torch.randn(state[key].shape, generator=g) * 0.05
            tensors[lora_keys(layout, module, kind)] = d
            expected[key] = expected.get(key, 0) + d
    metadata = None
    if layout == "diffusers" and alpha is not None:
        metadata = {"lora_adapter_metadata": json.dumps({"r": rank, "lora_alpha": alpha})}
    return tensors, metadata, expected


def write_lora(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def merged_model(tiny_dirs, variant, deltas_by_expert: dict[str, list[tuple[float, dict]]]):
    """A fresh model whose weights the test merged by hand: W + sum(weight * delta)."""
    model = fresh(tiny_dirs, variant)
    for attr, terms in deltas_by_expert.items():
        t = getattr(model.pipe, attr)
        state = t.state_dict()
        for weight, expected in terms:
            for key, delta in expected.items():
                state[key] = state[key] + weight * delta
        t.load_state_dict(state)
    return model


def short(tiny_story, **kw):
    """One 9-frame clip, 2 steps, no CFG: enough to run every LoRA'd module, cheap to decode."""
    return tiny_story(1, frames=9, steps=2, guidance=1.0, **kw)


_BASE: dict = {}


def generate(model, story):
    """The story's clips as (latents, frames)."""
    return [(c.latents, c.frames) for c in Engine(model).generate(story, progress=False)]


def base_clips(tiny_dirs, tiny_story, variant="wan21"):
    if variant not in _BASE:
        _BASE[variant] = generate(fresh(tiny_dirs, variant), short(tiny_story))
    return _BASE[variant]


def rel_err(a, b):
    """Largest relative error of the clips' latents (frames: also within one uint8 level)."""
    for (_, fa), (_, fb) in zip(a, b):
        assert int((fa.int() - fb.int()).abs().max()) <= 1
    return max(float((x - y).norm() / y.norm()) for (x, _), (y, _) in zip(a, b))


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_equals_weights_merged_by_hand(tiny_dirs, tiny_story, tmp_path, layout, fuse):
    model = fresh(tiny_dirs)
    alpha = {"comfy": 8.0, "kohya": 2.0, "diffusers": 6.0}.get(layout)  # svi: no alpha, scale 1
    tensors, metadata, expected = build_lora(model, layout, alpha=alpha, deltas=layout == "comfy")
    path = write_lora(tmp_path / f"{layout}.safetensors", tensors, metadata)
    weight = 0.7
    got = generate(model, short(tiny_story, loras=[LoraSpec(path, weight)], fuse_loras=fuse))
    want = generate(merged_model(tiny_dirs, "wan21", {"transformer": [(weight, expected)]}), short(tiny_story))
    assert rel_err(got, want) <= TOL
    base = base_clips(tiny_dirs, tiny_story)
    assert float((got[0][0] - base[0][0]).norm() / base[0][0].norm()) > 1e-2  # the LoRA did change the clip


def test_report_counts_modules_and_fused_weights_are_plain_layers(tiny_dirs, tiny_story, tmp_path):
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = fresh(tiny_dirs)
    tensors, _, _ = build_lora(model, "comfy", alpha=4.0, deltas=True)
    path = write_lora(tmp_path / "lx.safetensors", tensors)
    engine = Engine(model)
    engine.loras.apply([LoraSpec(path, 1.0)], fuse=True)
    (entry,) = engine.loras.summary()
    pairs = len(pair_modules(model))
    # 2 blocks x (norm2, norm_q, scale_shift_table) + head modulation + time_embedder.linear_1, beside the pairs
    assert entry["modules"] == {"transformer": pairs + 2 * 3 + 2}
    assert entry["layout"] == "comfy" and entry["ranks"] == [4] and entry["alphas"] == [4.0] and entry["fused"]
    assert entry["unapplied"] == []
    assert not any(isinstance(m, BaseTunerLayer) for m in model.transformer.modules())  # fused: no adapter left


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_stack_merges_directly_as_peft_fuses(tiny_dirs, tmp_path, dtype):
    """A fused stack adds W += weight * scale * B @ A itself (no peft adapter is ever injected: that
    injection was most of a cold start's LoRA cost) and gives the weights peft's own fuse gives.
    Different arithmetic (one float32 sum rounded once against peft's per-adapter merges), so
    tolerances: in float32 1e-6 of the weights' scale (float32 sums of a few terms differ ~1e-7);
    in bf16, where peft rounds the pairs and each adapter's merge to bf16, ours must be within half
    a bf16 ulp (|x| * 2^-8) of the exact merge, and no further from it than peft's own fuse."""
    from cliploom.models import formats

    t1, _, e1 = build_lora(fresh(tiny_dirs), "comfy", alpha=8.0, seed=1)
    t2, _, e2 = build_lora(fresh(tiny_dirs), "svi2", seed=2)
    p1, p2 = write_lora(tmp_path / "a.safetensors", t1), write_lora(tmp_path / "b.safetensors", t2)
    specs = [LoraSpec(p1, 0.7), LoraSpec(p2, -0.4)]

    ours = fresh(tiny_dirs)
    ours.transformer.to(dtype)
    engine = Engine(ours)
    engine.loras.apply(specs, fuse=True)
    assert not hasattr(ours.transformer, "peft_config")  # merged without peft
    assert engine.loras.summary()[0]["adapters"] == {"transformer": len(pair_modules(ours))}

    theirs = fresh(tiny_dirs)
    theirs.transformer.to(dtype)
    names = []
    for i, spec in enumerate(specs):
        theirs.transformer.load_lora_adapter(formats.read_lora(spec.path).peft_state_dict(), adapter_name=f"x{i}",
                                             prefix=None)
        names.append(f"x{i}")
    theirs.transformer.set_adapters(names, [s.weight for s in specs])
    theirs.transformer.fuse_lora(adapter_names=names)
    theirs.transformer.unload_lora()
    base = fresh(tiny_dirs).transformer.to(dtype).state_dict()
    got, want = ours.transformer.state_dict(), theirs.transformer.state_dict()
    assert got.keys() == want.keys()
    for key in pair_modules(ours):
        w = key + ".weight"
        moved = float((want[w].float() - base[w].float()).abs().max())
        assert moved > 1e-3, w  # the LoRA moved this weight, far beyond the tolerances below
        if dtype == torch.float32:
            err = float((got[w] - want[w]).abs().max())
            assert err <= 1e-6 * float(want[w].abs().max()), (w, err)
        else:
            exact = base[w].double() + 0.7 * e1[w].double() - 0.4 * e2[w].double()
            ours_err, peft_err = (got[w].double() - exact).abs(), (want[w].double() - exact).abs()
            assert bool((ours_err <= exact.abs() * 2 ** -8 + 1e-12).all()), w
            assert float(ours_err.max()) <= float(peft_err.max()), w


def test_a_fused_stack_has_the_weights_of_the_same_stack_merged(tiny_dirs, tmp_path):
    """A run resumed with its stack fused must have the weights of the uninterrupted run, which kept
    the stack unfused for clip 0 and merged it for the clips after: both go through
    ``lora.add_low_rank`` with the same float32 A (alpha/rank folded in) and B, in the stack's order,
    so the weights are equal exactly (one function on identical inputs in one process)."""
    t1, _, _ = build_lora(fresh(tiny_dirs), "comfy", alpha=8.0, seed=1, deltas=True)
    t2, _, _ = build_lora(fresh(tiny_dirs), "svi2", seed=2)
    specs = [LoraSpec(write_lora(tmp_path / "a.safetensors", t1), 0.7, name="a"),
             LoraSpec(write_lora(tmp_path / "b.safetensors", t2), 1.0, name="svi")]
    fused, merged = fresh(tiny_dirs), fresh(tiny_dirs)
    Engine(fused).loras.apply(specs, fuse=True)
    stack = Engine(merged).loras
    stack.apply(specs, fuse=False)
    stack.set_clip_weights({"svi": 0.0})  # clip 0 of first_clip: i2v, then the steady weights, merged
    stack.set_clip_weights(None)
    assert stack.merge()
    got = {k.replace(".base_layer", ""): v for k, v in merged.transformer.state_dict().items() if "lora_" not in k}
    want = fused.transformer.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_two_loras_stacked_equal_the_sum(tiny_dirs, tiny_story, tmp_path):
    model = fresh(tiny_dirs)
    t1, m1, e1 = build_lora(model, "svi2", seed=1)
    t2, m2, e2 = build_lora(model, "comfy", alpha=2.0, seed=2, deltas=True)
    p1 = write_lora(tmp_path / "svi.safetensors", t1)
    p2 = write_lora(tmp_path / "lightx2v.safetensors", t2)
    got = generate(model, short(tiny_story, loras=[LoraSpec(p1, 0.8), LoraSpec(p2, -0.5)]))
    want = generate(merged_model(tiny_dirs, "wan21", {"transformer": [(0.8, e1), (-0.5, e2)]}), short(tiny_story))
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("expert", ["high", "low", "both"])
def test_expert_targeting_touches_only_that_expert(tiny_dirs, tiny_story, tmp_path, expert, fuse):
    model = fresh(tiny_dirs, "wan22")
    base = {a: {k: v.clone() for k, v in getattr(model.pipe, a).state_dict().items()} for a in ("transformer", "transformer_2")}
    tensors, _, expected = build_lora(model, "kohya", alpha=4.0)
    path = write_lora(tmp_path / "lora.safetensors", tensors)
    # 9 frames, 2 steps from t=1000: the boundary (0.875) puts one step on each expert
    story = tiny_story(1, frames=9, steps=2, guidance=1.0, loras=[LoraSpec(path, 1.0, expert)], fuse_loras=fuse)
    engine = Engine(model)
    got = [(c.latents, c.frames) for c in engine.generate(story, progress=False)]
    targets = {"high": ["transformer"], "low": ["transformer_2"], "both": ["transformer", "transformer_2"]}[expert]
    assert set(engine.loras.summary()[0]["modules"]) == set(targets)
    if fuse:
        for attr in ("transformer", "transformer_2"):
            state = getattr(model.pipe, attr).state_dict()
            changed = any(not torch.equal(state[k], base[attr][k]) for k in base[attr])
            assert changed == (attr in targets), attr
    else:
        for attr in ("transformer", "transformer_2"):
            has_adapters = any("lora_A" in k for k in getattr(model.pipe, attr).state_dict())
            assert has_adapters == (attr in targets), attr
    want = generate(merged_model(tiny_dirs, "wan22", {a: [(1.0, expected)] for a in targets}),
                    tiny_story(1, frames=9, steps=2, guidance=1.0))
    assert rel_err(got, want) <= TOL


def test_per_clip_weights_equal_weights_merged_by_hand(tiny_dirs, tmp_path):
    """Unfused: set_clip_weights gives the transformer a merged-by-hand model would have, deltas included."""
    model = fresh(tiny_dirs)
    tensors, _, expected = build_lora(model, "comfy", alpha=4.0, deltas=True)
    path = write_lora(tmp_path / "style.safetensors", tensors)
    engine = Engine(model)
    engine.loras.apply([LoraSpec(path, 1.0, name="style")], fuse=False)
    out = transformer_output

    for w in (0.3, -1.0, 0.0):
        engine.loras.set_clip_weights({"style": w})
        want = out(merged_model(tiny_dirs, "wan21", {"transformer": [(w, expected)]}))
        assert float((out(model) - want).norm() / want.norm()) <= TOL, w
    engine.loras.set_clip_weights(None)  # back to the stack's own weight, without drift
    want = out(merged_model(tiny_dirs, "wan21", {"transformer": [(1.0, expected)]}))
    assert float((out(model) - want).norm() / want.norm()) <= TOL
    assert engine.loras.weights() == {"style": 1.0}


def transformer_output(model):
    """The wan21 tiny transformer on fixed random inputs."""
    g = torch.Generator().manual_seed(0)
    cfg = model.transformer.config
    inputs = dict(
        hidden_states=torch.randn(1, cfg.in_channels, 2, 4, 4, generator=g),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 512, cfg.text_dim, generator=g),
        encoder_hidden_states_image=torch.randn(1, 257, cfg.image_dim, generator=g),
        return_dict=False,
    )
    with torch.no_grad():
        return model.transformer(**inputs)[0]


def test_a_lora_saved_by_diffusers_gives_the_peft_model_it_came_from(tiny_dirs, tmp_path):
    """Interop: diffusers' own save_lora_weights (alpha in its metadata) round-trips exactly."""
    from diffusers import WanImageToVideoPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    trained = fresh(tiny_dirs)
    config = LoraConfig(r=4, lora_alpha=12, target_modules=["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2"])
    trained.transformer.add_adapter(config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in trained.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    want = transformer_output(trained)
    WanImageToVideoPipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=get_peft_model_state_dict(trained.transformer),
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    model = fresh(tiny_dirs)
    engine = Engine(model)
    engine.loras.apply([LoraSpec(path, 1.0)], fuse=True)
    assert engine.loras.summary()[0]["alphas"] == [12.0]
    got = transformer_output(model)
    assert float((got - want).norm() / want.norm()) <= TOL
    assert float((got - transformer_output(fresh(tiny_dirs))).norm() / want.norm()) > 1e-2


def test_story_changes_lora_weights_per_clip(tiny_dirs, tiny_story, tmp_path):
    from cliploom.story import ClipSpec

    model = fresh(tiny_dirs)
    tensors, _, _ = build_lora(model, "svi2")
    path = write_lora(tmp_path / "svi.safetensors", tensors)
    clips = [ClipSpec("a", lora_weights={"svi": 1.0}), ClipSpec("b", lora_weights={"svi": 0.25}), ClipSpec("c")]
    story = tiny_story(3, frames=9, steps=1, guidance=1.0, loras=[LoraSpec(path, 0.5, name="svi")], fuse_loras=False)
    story.clips = clips
    seen = []
    engine = Engine(model)

    def record(module, args):
        seen.append(round(module.blocks[0].attn1.to_q.scaling["cliploom_0"], 6))

    hook = model.transformer.register_forward_pre_hook(record)
    clip_starts, merged = [], []

    def started(i):
        clip_starts.append(len(seen))
        merged.append(engine.loras.merged)

    list(engine.generate(story, progress=False, on_clip_start=started))
    hook.remove()
    per_clip = [set(seen[a:b]) for a, b in zip(clip_starts, clip_starts[1:] + [len(seen)])]
    assert per_clip == [{1.0}, {0.25}, {0.5}]  # clip 3 has no weights: the stack's own
    # the last clip's weights stay to the end: it runs merged (float32 weights), the others unfused
    assert merged == [False, False, True]
    # a story whose weights never change (as every service job, fuse_loras false) runs merged throughout;
    # against the adapters unfused, the clips agree to float32 rounding (1e-5 of their scale)
    steady = tiny_story(2, frames=9, steps=2, guidance=1.0, loras=[LoraSpec(path, 0.5, name="svi")], fuse_loras=False)
    merged.clear()
    fast = list(engine.generate(steady, progress=False, on_clip_start=started))
    assert merged == [True, True]
    engine.loras.unmerge()
    engine.loras.merge = lambda: False  # the same story with merging off: adapters applied at every call
    slow = list(engine.generate(steady, progress=False))
    scale = float(slow[0].latents.abs().max())
    assert all(torch.allclose(a.latents, b.latents, atol=1e-5 * scale) for a, b in zip(fast, slow, strict=True))


def test_same_stack_is_not_reapplied_and_unfused_stacks_can_be_swapped(tiny_dirs, tiny_story, tmp_path, monkeypatch):
    from cliploom.models import formats

    model = fresh(tiny_dirs)
    base = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    t1, _, _ = build_lora(model, "comfy", deltas=True, seed=1)
    t2, _, e2 = build_lora(model, "svi1", seed=2)
    p1, p2 = write_lora(tmp_path / "a.safetensors", t1), write_lora(tmp_path / "b.safetensors", t2)
    engine = Engine(model)
    reads = []
    original = formats.read_lora
    monkeypatch.setattr(formats, "read_lora", lambda p: reads.append(p) or original(p))
    engine.loras.apply([LoraSpec(p1, 1.0)], fuse=False)
    engine.loras.apply([LoraSpec(p1, 1.0)], fuse=False)
    assert len(reads) == 1
    engine.loras.apply([LoraSpec(p2, 1.0)], fuse=True)  # the unfused stack is removed first
    state = model.transformer.state_dict()
    for key, value in base.items():
        assert torch.allclose(state[key], value + e2.get(key, 0), rtol=1e-5, atol=1e-6), key
    with pytest.raises(CliploomError, match="fused into them"):
        engine.loras.apply([LoraSpec(p1, 1.0)], fuse=True)


def test_merge_runs_an_unfused_stack_as_fused_until_its_weights_change(tiny_dirs, tmp_path):
    """``merge``: the adapters' products added to the float32 weights (as ``fuse``), the adapters
    kept; a weight change unmerges first, back to exactly the weights before (a copy put back, so
    the same story gives the same frames whatever the engine ran before); bf16 weights stay unfused."""
    model = fresh(tiny_dirs)
    base = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    tensors, _, expected = build_lora(model, "svi1", seed=3)
    path = write_lora(tmp_path / "a.safetensors", tensors)
    engine = Engine(model)
    engine.loras.apply([LoraSpec(path, 1.0, name="a")], fuse=False)

    def weights():  # the base layers' weights under peft's wrapping, by their plain names
        return {k.replace(".base_layer", ""): v for k, v in model.transformer.state_dict().items() if "lora_" not in k}

    assert engine.loras.merge() and engine.loras.merged and engine.loras.summary()[0]["merged"]
    for key, value in weights().items():
        assert torch.allclose(value, base[key] + expected.get(key, 0), rtol=1e-5, atol=1e-6), key
    engine.loras.set_clip_weights({"a": 0.5})  # merged at weight 1: taken out before the weight changes
    assert not engine.loras.merged
    for key, value in weights().items():
        assert torch.equal(value, base[key]), key  # a copy put back, no arithmetic: exact on any CPU
    engine.loras.merge()
    for key, value in weights().items():
        assert torch.allclose(value, base[key] + 0.5 * expected.get(key, 0), rtol=1e-5, atol=1e-6), key
    engine.loras.clear()  # unmerges (a copy put back, no arithmetic) before peft drops the adapters
    for key, value in model.transformer.state_dict().items():
        assert torch.equal(value, base[key]), key
    half = load_model(tiny_dirs["wan21"], device="cpu", dtype=torch.bfloat16)
    stack = Engine(half).loras
    stack.apply([LoraSpec(path, 1.0)], fuse=False)
    assert not stack.merge() and not stack.merged  # a bf16 round trip would lose up to an ulp each time


# -- errors and warnings -------------------------------------------------------------------------


def apply(model, path, **kw):
    Engine(model).loras.apply([LoraSpec(path, **kw)], fuse=True)


def test_lora_that_matches_nothing_is_an_error(tiny_dirs, tmp_path):
    model = fresh(tiny_dirs)
    tensors = {"blocks.7.self_attn.q.lora_A.default.weight": torch.randn(4, 24),
               "blocks.7.self_attn.q.lora_B.default.weight": torch.randn(24, 4)}
    with pytest.raises(CliploomError, match="matches no module"):
        apply(model, write_lora(tmp_path / "deep.safetensors", tensors))
    flux = {"double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(4, 24),
            "double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(72, 4)}
    with pytest.raises(CliploomError, match="no LoRA weights for a Wan DiT"):
        apply(model, write_lora(tmp_path / "flux.safetensors", flux))


def test_unapplied_keys_are_listed_in_a_warning(tiny_dirs, tmp_path, caplog):
    model = fresh(tiny_dirs)
    tensors, _, _ = build_lora(model, "svi1")
    tensors["pipe.dit.dwpose_embedding.0.weight"] = torch.randn(8, 3, 3, 3, 3)  # SVI-Dance's pose encoder
    tensors["pipe.dit.dwpose_embedding.0.bias"] = torch.randn(8)
    path = write_lora(tmp_path / "svi_dance.safetensors", tensors)
    engine = Engine(model)
    with caplog.at_level(logging.WARNING, logger="cliploom.models"):
        engine.loras.apply([LoraSpec(path, 1.0)])
    text = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "2 key(s) not applied: pipe.dit.dwpose_embedding.0 (full weights, not a LoRA" in text
    assert engine.loras.summary()[0]["unapplied"] == ["pipe.dit.dwpose_embedding.0.bias", "pipe.dit.dwpose_embedding.0.weight"]


def test_wan21_image_attention_keys_on_wan22_are_reported_not_applied(tiny_dirs, tmp_path, caplog):
    wan21 = fresh(tiny_dirs)
    tensors, _, _ = build_lora(wan21, "svi2")
    path = write_lora(tmp_path / "svi21.safetensors", tensors)
    wan22 = fresh(tiny_dirs, "wan22")
    engine = Engine(wan22)
    with caplog.at_level(logging.WARNING, logger="cliploom.models"):
        engine.loras.apply([LoraSpec(path, 1.0)])
    unapplied = engine.loras.summary()[0]["unapplied"]
    assert unapplied and all("k_img" in k or "v_img" in k or "img_emb" in k for k in unapplied)


def test_shape_mismatch_names_the_key_and_both_shapes(tiny_dirs, tmp_path):
    model = fresh(tiny_dirs)
    tensors, _, _ = build_lora(model, "comfy")
    tensors["diffusion_model.blocks.1.self_attn.k.lora_down.weight"] = torch.randn(4, 40)
    with pytest.raises(CliploomError) as e:
        apply(model, write_lora(tmp_path / "wide.safetensors", tensors))
    msg = str(e.value)
    assert "diffusion_model.blocks.1.self_attn.k.lora_down.weight" in msg and "(4, 40)" in msg and "(24, 24)" in msg
    tensors, _, _ = build_lora(model, "comfy")
    tensors["diffusion_model.blocks.0.norm3.diff"] = torch.randn(30)
    with pytest.raises(CliploomError, match=r"blocks.0.norm3.diff has shape \(30,\).*\(24,\)"):
        apply(model, write_lora(tmp_path / "norm.safetensors", tensors))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_lora_is_an_error(tiny_dirs, tmp_path, bad):
    model = fresh(tiny_dirs)
    tensors, _, _ = build_lora(model, "svi2")
    key = "blocks.0.ffn.2.lora_B.default.weight"
    tensors[key][3, 1] = bad
    with pytest.raises(CliploomError, match=rf"{key} holds 1 NaN/Inf value"):
        apply(model, write_lora(tmp_path / "bad.safetensors", tensors))


def test_malformed_and_foreign_files_are_errors(tiny_dirs, tmp_path):
    model = fresh(tiny_dirs)
    pickle = tmp_path / "lora.pth"
    torch.save({"a": torch.zeros(1)}, pickle)
    with pytest.raises(CliploomError, match="pickle, which cliploom never loads"):
        apply(model, pickle)
    tensors, _, _ = build_lora(model, "svi2")
    del tensors["blocks.0.ffn.0.lora_B.default.weight"]
    with pytest.raises(CliploomError, match="blocks.0.ffn.0 has a down .A. weight but not its partner"):
        apply(model, write_lora(tmp_path / "half.safetensors", tensors))
    dora = {"blocks.0.self_attn.q.lora_A.weight": torch.randn(4, 24), "blocks.0.self_attn.q.lora_B.weight": torch.randn(24, 4),
            "blocks.0.self_attn.q.lora_magnitude_vector": torch.randn(24)}
    with pytest.raises(CliploomError, match="DoRA"):
        apply(model, write_lora(tmp_path / "dora.safetensors", dora))
    base = tiny_dirs["wan21"] / "transformer" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(CliploomError, match="is not a LoRA .it holds dit weights"):
        apply(model, base)
    tensors, _, _ = build_lora(model, "svi2")
    with pytest.raises(CliploomError, match="targets the low-noise expert, but model .* has one transformer"):
        apply(model, write_lora(tmp_path / "svi.safetensors", tensors), expert="low")


def test_expert_named_file_applied_to_both_experts_warns(tiny_dirs, tmp_path, caplog):
    model = fresh(tiny_dirs, "wan22")
    tensors, _, _ = build_lora(model, "svi2")
    path = write_lora(tmp_path / "SVI_v2_PRO_Wan2.2-I2V-A14B_HIGH_lora_rank_4.safetensors", tensors)
    with caplog.at_level(logging.WARNING, logger="cliploom.models"):
        apply(model, path)
    assert any("name says high-noise expert" in r.getMessage() for r in caplog.records)


def test_cli_reports_lora_errors_as_one_line(tiny_dirs, reference_png, tmp_path, capsys):
    from cliploom.cli import main

    bad = write_lora(tmp_path / "nowhere.safetensors", {"blocks.9.self_attn.q.lora_A.weight": torch.randn(4, 24),
                                                        "blocks.9.self_attn.q.lora_B.weight": torch.randn(24, 4)})
    code = main(["generate", "--model", str(tiny_dirs["wan21"]), "--image", str(reference_png), "--prompt", "a",
                 "--frames", "9", "--steps", "1", "--lora", f"{bad}:0.5", "--out", str(tmp_path / "o.mp4"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: LoRA") and "matches no module" in err[0]
