"""Other routes' checkpoint folders (issue 17): a SkyReels-V2 diffusion-forcing folder loads as the
``df`` route's own model (per-frame timesteps and fps input given as SkyReels' pipelines give them);
a causal Wan in FastVideo's diffusers layout as the causal routes' own model (a text-to-video DiT:
the reference image is the first cached block); a Helios folder as the helios route's (only)."""

from __future__ import annotations

import json

import pytest
import torch

from cliploom.engine import Engine
from cliploom.errors import CliploomError
from cliploom.models.tiny import make_tiny


@pytest.fixture(scope="module")
def skyreels_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("skyreels") / "df", "skyreels-df")


@pytest.fixture(scope="module")
def skyreels(skyreels_dir):
    return Engine.load(skyreels_dir, device="cpu")


def _story(tiny_story, n=2, **kw):
    return tiny_story(n, width=32, height=32, guidance=1.0, **kw)


def test_the_folder_is_the_one_diffusers_writes_and_loads_as_a_df_model(skyreels_dir, skyreels):
    from diffusers import SkyReelsV2Transformer3DModel

    index = json.loads((skyreels_dir / "model_index.json").read_text())
    assert index["_class_name"] == "SkyReelsV2DiffusionForcingPipeline"
    assert not (skyreels_dir / "cliploom.json").exists()  # as published: no settings of ours
    model = skyreels.model
    assert isinstance(model.transformer, SkyReelsV2Transformer3DModel)
    assert model.settings.native_routes == ("df",)
    assert model.settings.expand_timesteps  # no y channels: the prefix frames enter as clean latents
    assert model.settings.shift == 8.0  # the scheduler's flow_shift


def test_frames_get_their_own_timesteps_the_context_zero(skyreels, tiny_story):
    """Each call gets ``[B, F]`` timesteps (SkyReels' diffusion forcing): 0 on the anchor and the
    motion latent, ``addnoise`` on the motion latent when set, the step's on every frame to make."""
    model = skyreels.model
    seen = []
    hook = model.transformer.condition_embedder.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    try:
        list(skyreels.generate(_story(tiny_story, route="df", route_options={"addnoise": 20}), progress=False))
    finally:
        hook.remove()
    first, later = seen[0], seen[-1]
    assert first.shape == (1, 3) and first[0, 0] == 0 and (first[0, 1:] > 0).all()  # 9 frames: 3 latents
    assert later[0, 0] == 0 and later[0, 1] == 20 and later[0, 2] > 20  # anchor, motion (noised to 20), new


@pytest.mark.parametrize("fps, label", [(16, 0), (24, 1)])
def test_fps_reaches_the_model_as_skyreels_pipelines_give_it(skyreels, tiny_story, fps, label):
    model = skyreels.model
    seen = []
    hook = model.transformer.fps_embedding.register_forward_pre_hook(lambda m, a: seen.append(a[0].tolist()))
    try:
        list(skyreels.generate(_story(tiny_story, n=1, fps=fps, route="df"), progress=False))
    finally:
        hook.remove()
    assert seen and all(v == [label] for v in seen)


def test_df_needs_no_route_lora_and_svi_runs_the_same_prefix(skyreels, tiny_story):
    """The DF DiT is the route's own weights. On a model without ``y`` channels ``svi`` gives the
    anchor and motion latents as clean prefix frames too, so with clean context (``addnoise`` 0)
    the two routes compute the same values -- through two conditioning functions, so compared
    with a tolerance (1e-5 of the latents' scale), not bit for bit."""
    df = list(skyreels.generate(_story(tiny_story, route="df"), progress=False))
    svi = list(skyreels.generate(_story(tiny_story), progress=False))
    assert skyreels.default_loras(_story(tiny_story, route="df")) == []
    torch.testing.assert_close(df[1].latents, svi[1].latents, rtol=0, atol=1e-5 * float(svi[1].latents.abs().max()))
    noised = list(skyreels.generate(_story(tiny_story, route="df", route_options={"addnoise": 200}), progress=False))
    assert (noised[1].latents - df[1].latents).abs().max() > 1e-3  # context noise moves the clip


def test_guidance_runs_the_two_passes_as_skyreels_does(skyreels, tiny_story):
    """diffusers' fps term broadcasts over a batch of one only: a guided batch of two is run sample by
    sample, each as diffusers' own forward with per-frame timesteps (the same computation: exact)."""
    from diffusers import SkyReelsV2Transformer3DModel

    tr = skyreels.model.transformer
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, 4, 4, generator=g)
    text = torch.randn(2, 5, tr.config.text_dim, generator=g)
    per_token = torch.tensor([0.0, 500.0, 500.0]).repeat_interleave(4).expand(2, -1)  # 4 tokens a frame
    with torch.no_grad():
        both = tr(hidden_states=x, timestep=per_token, encoder_hidden_states=text, return_dict=False)[0]
        for i in range(2):
            alone = SkyReelsV2Transformer3DModel.forward(
                tr, hidden_states=x[i : i + 1], timestep=torch.tensor([[0.0, 500.0, 500.0]]),
                encoder_hidden_states=text[i : i + 1], enable_diffusion_forcing=True, fps=[0], return_dict=False)[0]
            assert torch.equal(both[i : i + 1], alone)
    clips = list(skyreels.generate(tiny_story(2, width=32, height=32, guidance=3.0, route="df"), progress=False))
    assert all(torch.isfinite(c.latents).all() for c in clips)


def test_a_skyreels_folder_that_is_not_diffusion_forcing_is_not_a_df_model(skyreels_dir, tmp_path):
    import shutil

    plain = tmp_path / "t2v"
    shutil.copytree(skyreels_dir, plain)
    index = json.loads((plain / "model_index.json").read_text())
    (plain / "model_index.json").write_text(json.dumps({**index, "_class_name": "SkyReelsV2Pipeline"}))
    with pytest.raises(CliploomError, match="is a text-to-video Wan model"):  # no df training, no y channels
        Engine.load(plain, device="cpu")


def test_memory_guidance_is_refused_where_the_memory_is_not_in_y(skyreels, tiny_story, tiny_models):
    from cliploom.loom import weave
    from cliploom.routes.causal import weave as causal_weave

    for model, story in ((skyreels.model, _story(tiny_story, memory_guidance=2.0)),
                         (tiny_models("wan21"), tiny_story(2, route="df", memory_guidance=2.0))):
        with pytest.raises(CliploomError, match="memory_guidance 2.0 needs the motion memory in y"):
            list(weave(model, story, progress=False))
    with pytest.raises(CliploomError, match="route causal has no motion memory in y"):
        list(causal_weave(tiny_models("wan21"), tiny_story(2, route="causal", memory_guidance=2.0), progress=False))


def test_other_routes_still_need_their_weights(skyreels, tiny_story):
    with pytest.raises(CliploomError, match="has no causal weights"):
        list(skyreels.generate(_story(tiny_story, route="causal"), progress=False))


def test_inspect_names_the_route(skyreels_dir, capsys):
    from cliploom.cli import main

    assert main(["inspect", str(skyreels_dir)]) == 0
    assert "route: df" in capsys.readouterr().out


@pytest.fixture(scope="module")
def fastvideo_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("fastvideo") / "sf", "causal-fastvideo")


def test_a_fastvideo_self_forcing_folder_is_the_causal_routes_own_model(fastvideo_dir, tiny_story):
    engine = Engine.load(fastvideo_dir, device="cpu")
    settings = engine.model.settings
    assert settings.native_routes == ("self-forcing", "causal")  # its scheduler says Self-Forcing
    assert settings.expand_timesteps and settings.shift == 5.0
    assert engine.default_loras(_story(tiny_story, route="self-forcing")) == []
    seen = []
    hook = engine.model.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["hidden_states"].clone(), kw["timestep"].clone())), with_kwargs=True)
    try:
        clips = list(engine.generate(_story(tiny_story, n=3, route="self-forcing"), progress=False))
    finally:
        hook.remove()
    assert [len(c.frames) for c in clips] == [9, 4, 4]
    # the first pass writes the anchor: no y channels, the latent itself, clean at timestep 0
    hidden, t = seen[0]
    assert hidden.shape[1] == engine.model.z_dim and t.tolist() == [0.0]
    assert torch.equal(hidden, clips[0].latents[:, :, :1])  # the anchor, as the clip keeps it
    assert all(h.shape[1] == engine.model.z_dim for h, _ in seen)
    # its DMD student samples as it was trained: x0 and fresh noise at every step (renoise)
    assert settings.sampler == "renoise" and settings.timesteps == [1000, 750, 500, 250]
    resolved = _story(tiny_story, route="self-forcing", steps=None).resolve(settings, 16, 4)
    assert resolved.sampler == "renoise" and resolved.timesteps == [1000, 750, 500, 250]  # its warped 4-step list
    assert len(seen) == 1 + 2 * (2 + 1) + 2 * (2 + 1)  # the anchor; clip 0's 2 blocks, then 1 a clip: 2 steps + the write
    ode = list(engine.generate(_story(tiny_story, n=3, route="self-forcing", sampler="euler"), progress=False))
    again = list(engine.generate(_story(tiny_story, n=3, route="self-forcing"), progress=False))
    assert not torch.allclose(ode[0].latents, clips[0].latents, atol=1e-3)  # another sampler, not rounding
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(again, clips, strict=True))  # seeded: same path, exact


def test_a_self_forcing_folder_s_own_settings_win_over_its_sampling_defaults(fastvideo_dir, tmp_path):
    import shutil

    folder = tmp_path / "sf"
    shutil.copytree(fastvideo_dir, folder)
    (folder / "cliploom.json").write_text(json.dumps({"sampler": "euler", "steps": 3}))
    settings = Engine.load(folder, device="cpu").model.settings
    assert settings.sampler == "euler" and settings.steps == 3 and settings.timesteps is None


def test_inspect_names_the_self_forcing_route_and_a_plain_text_to_video_folder_is_refused(fastvideo_dir, tmp_path, capsys):
    import shutil

    from cliploom.cli import main

    assert main(["inspect", str(fastvideo_dir)]) == 0
    assert "route: self-forcing" in capsys.readouterr().out
    plain = tmp_path / "t2v"
    shutil.copytree(fastvideo_dir, plain)
    config = json.loads((plain / "transformer" / "config.json").read_text())
    (plain / "transformer" / "config.json").write_text(json.dumps({**config, "_class_name": "WanTransformer3DModel"}))
    (plain / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "UniPCMultistepScheduler"}))
    with pytest.raises(CliploomError, match="is a text-to-video Wan model"):
        Engine.load(plain, device="cpu")


def test_a_helios_folder_runs_the_helios_route_on_its_own_transformer_and_nothing_else(tmp_path, tiny_story):
    from diffusers import HeliosTransformer3DModel

    engine = Engine.load(make_tiny(tmp_path / "helios", "helios"), device="cpu")
    model = engine.model
    assert isinstance(model.transformer, HeliosTransformer3DModel) and model.settings.native_routes == ("helios",)
    assert engine.default_loras(_story(tiny_story, route="helios")) == []
    seen = []
    hook = model.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:
        # one resolution here (its own three pyramid stages: tests/test_pyramid.py)
        clips = list(engine.generate(_story(tiny_story, n=3, route="helios", route_options={"stages": 1}),
                                     progress=False))
    finally:
        hook.remove()
    assert [len(c.frames) for c in clips] == [9, 4, 4]
    # every pass takes the past as history: the anchor first in the short slot (the same tensor: exact)
    assert all(torch.equal(kw["latents_history_short"][:, :, :1], clips[0].latents[:, :, :1]) for kw in seen)
    assert seen[-1]["latents_history_short"].shape[2] > 1  # and later clips the latents before them
    with pytest.raises(CliploomError, match="is a Helios DiT: .* runs route helios only, not svi"):
        list(engine.generate(_story(tiny_story), progress=False))


def test_a_converted_self_forcing_checkpoint_loads_as_the_causal_routes_own_model(fastvideo_dir, tmp_path, tiny_story):
    """Self-Forcing's ``.pt`` -> ``cliploom convert`` -> an original-layout DiT tagged ``causal``,
    read with a family (the shipped ``wan21-t2v-1.3b-causal`` for the real 1.3B; a tiny one here):
    the causal routes run on it without a route LoRA, the reference image first in the cache."""
    import shutil

    from real_layouts import diffusers_state, to_original_dit

    from cliploom.cli import main

    original = to_original_dit(diffusers_state(fastvideo_dir, "transformer"))
    ckpt = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator_ema": {f"model.{k}": v for k, v in original.items()}}, ckpt)
    folder = tmp_path / "sf"
    folder.mkdir()
    assert main(["convert", str(ckpt), "-o", str(folder / "self_forcing_dmd.safetensors")]) == 0
    for name in ("vae", "text_encoder", "tokenizer"):
        shutil.copytree(fastvideo_dir / name, folder / name)
    family = {"name": "tiny-causal", "transformer": json.loads((fastvideo_dir / "transformer" / "config.json").read_text()),
              "vae": json.loads((fastvideo_dir / "vae" / "config.json").read_text()), "experts": 1,
              "settings": {"width": 32, "height": 32, "frames": 9, "max_sequence_length": 64}}
    family_file = tmp_path / "tiny-causal.json"
    family_file.write_text(json.dumps(family))
    engine = Engine.load(folder / "self_forcing_dmd.safetensors", device="cpu", family=str(family_file))
    assert engine.model.settings.native_routes == ("causal", "self-forcing")  # from the converter's tag
    assert engine.model.settings.expand_timesteps
    clips = list(engine.generate(_story(tiny_story, n=2, route="self-forcing"), progress=False))
    assert [len(c.frames) for c in clips] == [9, 4]
    with pytest.raises(CliploomError, match="is a text-to-video Wan model"):  # the same DiT untagged is refused
        from safetensors.torch import save_file

        save_file(original, str(folder / "self_forcing_dmd.safetensors"))
        Engine.load(folder / "self_forcing_dmd.safetensors", device="cpu", family=str(family_file))
