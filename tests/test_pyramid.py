"""Helios' pyramid sampling (issue 17): `cliploom.sampling.sample_pyramid` against diffusers'
`HeliosPyramidPipeline` itself, on a tiny Helios folder whose transformer is replaced by a fixed
function of its input and timestep (so the comparison is of the sampling -- stages, schedules,
renoising, DMD steps -- and not of the history layout, which the helios route builds its own way);
and the route's `stages` option end to end."""

from __future__ import annotations

import pytest
import torch

from cliploom.models.tiny import make_tiny
from cliploom.sampling import block_noise, pyramid_stage_steps, sample_pyramid


@pytest.fixture(scope="module")
def helios_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("helios") / "helios", "helios")


def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A stand-in for the transformer: nonlinear in x, mixing neighbours, depending on t."""
    return torch.tanh(x) * (0.3 + t.float().view(-1, 1, 1, 1, 1) / 1000) + 0.2 * x.roll(1, dims=-1)


def _pipeline(folder, scheduler, distilled: bool):
    from diffusers import AutoencoderKLWan, HeliosPyramidPipeline, HeliosTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    transformer = HeliosTransformer3DModel.from_pretrained(folder / "transformer")
    transformer.forward = lambda hidden_states, timestep, **_: (velocity(hidden_states, timestep),)
    return HeliosPyramidPipeline(tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
                                 text_encoder=UMT5EncoderModel.from_pretrained(folder / "text_encoder"),
                                 vae=AutoencoderKLWan.from_pretrained(folder / "vae"), scheduler=scheduler,
                                 transformer=transformer, is_distilled=distilled)


@pytest.mark.parametrize("kind", ["euler", "unipc", "dmd", "dmd-amplify"])
def test_sample_pyramid_equals_diffusers_helios_pyramid_pipeline(helios_dir, kind, monkeypatch):
    from diffusers import HeliosDMDScheduler, HeliosPyramidPipeline, HeliosScheduler
    from diffusers.utils.torch_utils import randn_tensor

    def scheduler():
        if kind.startswith("dmd"):
            return HeliosDMDScheduler(stages=3, use_dynamic_shifting=True, shift=1.0)
        return HeliosScheduler(stages=3, scheduler_type=kind, use_dynamic_shifting=True, shift=1.0)

    pipe = _pipeline(helios_dir, scheduler(), kind.startswith("dmd"))
    amplify = kind == "dmd-amplify"  # the distilled pipeline's twice-the-steps first chunk
    steps, chunk = [2, 3, 2], 2
    size = 64  # latents halved twice by the stages; the VAE's spatial scale is read below
    # the pipeline's own block noise takes a float32 Cholesky of a matrix that is singular at gamma 1/3
    # and fails on CPU; it draws the same values as ours where it works (the test below)
    monkeypatch.setattr(HeliosPyramidPipeline, "sample_block_noise", lambda self, b, c, f, h, w, patch, device,
                        generator: block_noise((b, c, f, h, w), self.scheduler.config.gamma, patch, generator))
    reference = pipe(prompt="a red circle", height=size, width=size, num_frames=(chunk - 1) * 4 + 1,
                     guidance_scale=1.0, num_latent_frames_per_chunk=chunk, pyramid_num_inference_steps_list=steps,
                     history_sizes=[2, 1, 1], generator=torch.Generator("cpu").manual_seed(3),
                     output_type="latent", return_dict=False, is_amplify_first_chunk=amplify)[0]
    monkeypatch.undo()

    s = pipe.vae_scale_factor_spatial
    generator = torch.Generator("cpu").manual_seed(3)
    noise = randn_tensor((1, 16, chunk, size // s, size // s), generator=generator, dtype=torch.float32)
    calls = []
    ours = sample_pyramid(lambda x, sigma: calls.append(sigma) or velocity(x, torch.tensor([sigma * 1000])), noise,
                          scheduler(), steps, tuple(pipe.transformer.config.patch_size), generator, amplify=amplify)
    assert len(calls) == sum(steps) * (2 if amplify else 1)
    assert ours.shape == reference.shape
    # the same operations in the same order on one machine; timesteps pass through t / 1000 * 1000 here
    # (float64 rounding, ~1e-13) where the pipeline hands the integer over: float32-level agreement
    torch.testing.assert_close(ours, reference.float(), rtol=1e-4, atol=1e-4)
    assert float((ours - noise).abs().mean()) > 0.1  # it did sample


def test_steps_spread_over_stages_and_too_few_are_refused():
    assert pyramid_stage_steps(30, 3) == [10, 10, 10]
    assert pyramid_stage_steps(8, 3) == [3, 3, 2]
    assert pyramid_stage_steps(8, 1) == [8]
    with pytest.raises(ValueError, match="2 steps cannot fill 3 pyramid stages"):
        pyramid_stage_steps(2, 3)


def test_block_noise_draws_what_the_pipeline_draws_where_its_float32_cholesky_works():
    from types import SimpleNamespace

    from diffusers import HeliosPyramidPipeline

    shape, patch = (1, 3, 2, 8, 6), (1, 2, 2)
    fake = SimpleNamespace(scheduler=SimpleNamespace(config=SimpleNamespace(gamma=0.25)))  # all it reads
    theirs = HeliosPyramidPipeline.sample_block_noise(fake, *shape, patch, torch.device("cpu"),
                                                      torch.Generator("cpu").manual_seed(5))
    ours = block_noise(shape, 0.25, patch, torch.Generator("cpu").manual_seed(5))
    # the same draws through a float32 factor (theirs) and a float64 one cast to float32 (ours)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # and the covariance it promises: within a patch (1 + gamma) on the diagonal, -gamma off it
    many = block_noise((1, 1, 1, 400, 400), 1 / 3, patch, torch.Generator("cpu").manual_seed(0))
    blocks = many.view(200, 2, 200, 2).permute(0, 2, 1, 3).reshape(-1, 4)
    cov = blocks.T @ blocks / blocks.shape[0]
    expected = torch.eye(4) * (4 / 3) - 1 / 3
    assert float((cov - expected).abs().max()) < 0.03  # 40 000 samples: standard error ~0.007


def _helios_story(tiny_story, **kw):
    return tiny_story(2, width=64, height=64, guidance=1.0, route="helios", **kw)


def test_a_helios_folder_samples_with_its_own_pyramid_stages(helios_dir, tiny_story, tmp_path):
    import json
    import shutil

    from cliploom.engine import Engine
    from cliploom.errors import CliploomError

    engine = Engine.load(helios_dir, device="cpu")
    assert engine.model.settings.helios_scheduler["stages"] == 3 and engine.model.settings.sampler == "unipc"
    seen = []
    hook = engine.model.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append((tuple(kw["hidden_states"].shape[-2:]), float(kw["timestep"][0]))), with_kwargs=True)
    try:
        clips = list(engine.generate(_helios_story(tiny_story, steps=4), progress=False))
    finally:
        hook.remove()
    h = 64 // engine.model.scale_spatial
    # 4 steps over 3 stages ([2, 1, 1]) per clip, at a quarter, half and full resolution
    sizes = [s for s, _ in seen]
    assert sizes == [(h // 4, h // 4)] * 2 + [(h // 2, h // 2), (h, h)] + [(h // 4, h // 4)] * 2 + [(h // 2, h // 2), (h, h)]
    times = [t for _, t in seen[:4]]
    assert times == sorted(times, reverse=True) and times[0] > 900 and times[-1] < 400  # each stage its window
    assert [len(c.frames) for c in clips] == [9, 4]
    assert all(bool(torch.isfinite(c.latents).all()) for c in clips)

    # stages: 1 is one resolution; too few steps, a size that does not halve, renoise: one line each
    seen.clear()
    hook = engine.model.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(tuple(kw["hidden_states"].shape[-2:])), with_kwargs=True)
    try:
        list(engine.generate(_helios_story(tiny_story, steps=2, route_options={"stages": 1}), progress=False))
    finally:
        hook.remove()
    assert set(seen) == {(h, h)}
    for story, message in ((_helios_story(tiny_story, steps=2), r"3 pyramid stages \(Helios' scheduler\) needs at least 3 steps, got 2"),
                           (tiny_story(2, width=48, height=48, steps=3, guidance=1.0, route="helios"),
                            "do not halve 2 times into whole patches"),
                           (_helios_story(tiny_story, steps=3, sampler="renoise"), "not renoise")):
        with pytest.raises(CliploomError, match=message):
            list(engine.generate(story, progress=False))

    # a distilled folder (HeliosDMDScheduler and is_distilled, as Helios-Distilled ships) runs its DMD
    # steps, unguided, two per stage unless its cliploom.json says otherwise
    distilled = tmp_path / "distilled"
    shutil.copytree(helios_dir, distilled)
    config = {"_class_name": "HeliosDMDScheduler", "stages": 3, "use_dynamic_shifting": True, "shift": 1.0}
    (distilled / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    index = json.loads((distilled / "model_index.json").read_text())
    (distilled / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    engine = Engine.load(distilled, device="cpu")
    settings = engine.model.settings
    assert settings.sampler is None and settings.guidance == 1.0 and settings.steps == 6  # DMD: no solver to name
    clips = list(engine.generate(tiny_story(2, width=64, height=64, steps=None, route="helios"), progress=False))
    assert [len(c.frames) for c in clips] == [9, 4] and all(bool(torch.isfinite(c.latents).all()) for c in clips)
    # amplify_first: the first clip with twice the DMD steps (its pipeline's is_amplify_first_chunk), later ones not
    seen = _timesteps_seen(engine, tiny_story(2, width=64, height=64, steps=None, route="helios",
                                              route_options={"amplify_first": True}))
    assert len(seen) == 2 * 6 + 6
    # on a folder without DMD steps to double it is refused in one line
    with pytest.raises(CliploomError, match="amplify_first doubles a distilled Helios folder's DMD steps"):
        list(Engine.load(helios_dir, device="cpu").generate(
            _helios_story(tiny_story, steps=3, route_options={"amplify_first": True}), progress=False))


def _timesteps_seen(engine, story):
    seen = []
    hook = engine.model.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["hidden_states"].shape[-1], float(kw["timestep"][0]))), with_kwargs=True)
    try:
        list(engine.generate(story, progress=False))
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("config, asked, widths", [
    ({"_class_name": "HeliosScheduler"}, 0, 3),  # no stages key: diffusers' default, 3
    ({"_class_name": "HeliosScheduler"}, 2, 2),  # the stages asked, the windows re-cut
    ({"_class_name": "HeliosDMDScheduler"}, 2, 2),
    ({"_class_name": "HeliosScheduler", "stages": 1, "stage_range": [0, 1]}, 0, 1),  # one stage, its scheduler
])
def test_a_folder_scheduler_sets_the_stages_unless_the_route_option_does(helios_dir, tiny_story, tmp_path, config,
                                                                          asked, widths):
    import json
    import shutil

    from diffusers import HeliosDMDScheduler, HeliosScheduler

    from cliploom.engine import Engine

    folder = tmp_path / "f"
    shutil.copytree(helios_dir, folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "shift": 1.0}))
    engine = Engine.load(folder, device="cpu")
    options = {"stages": asked} if asked else {}
    seen = _timesteps_seen(engine, tiny_story(1, width=64, height=64, steps=6, guidance=1.0, route="helios",
                                              route_options=options))
    assert len({w for w, _ in seen}) == widths and len(seen) == 6
    # every stage's window is walked down to its end: the last call is near t = 0 (a scheduler left at
    # its default 3 stages while 2 were asked would stop a third of the way down)
    assert seen[-1][1] < 200
    if widths == 1:  # the folder's scheduler drives one stage: its own timesteps, not cliploom's schedule
        cls = HeliosDMDScheduler if config["_class_name"] == "HeliosDMDScheduler" else HeliosScheduler
        sched = cls.from_config({**config, "shift": 1.0})
        sched.set_timesteps(6, 0)
        assert [t for _, t in seen] == [float(int(t)) for t in sched.timesteps]


def test_cfg_zero_star_guides_as_the_pipeline_does(helios_dir, monkeypatch):
    """The route's denoiser and zero-init (CFG-Zero*, is_cfg_zero_star folders) against the pipeline
    with guidance 3, both over the same embeddings and a stand-in transformer that reads them."""
    from diffusers import HeliosPyramidPipeline, HeliosScheduler
    from diffusers.utils.torch_utils import randn_tensor

    from cliploom.routes import helios as route
    from cliploom.sampling import Expert

    def guided_velocity(x, t, emb):
        per_item = emb.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1), emb.std(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        return velocity(x, t) * (1 + per_item[0]) + 0.1 * per_item[1]  # each batch item on its own

    pipe = _pipeline(helios_dir, HeliosScheduler(stages=3, scheduler_type="euler", use_dynamic_shifting=True), False)
    pipe.register_to_config(is_cfg_zero_star=True)
    pipe.transformer.forward = lambda hidden_states, timestep, encoder_hidden_states, **_: (
        guided_velocity(hidden_states, timestep, encoder_hidden_states).contiguous(),)  # as a transformer returns
    monkeypatch.setattr(HeliosPyramidPipeline, "sample_block_noise", lambda self, b, c, f, h, w, patch, device,
                        generator: block_noise((b, c, f, h, w), self.scheduler.config.gamma, patch, generator))
    emb = torch.randn(2, 6, pipe.text_encoder.config.d_model, generator=torch.Generator().manual_seed(1))
    steps, size = [3, 2, 2], 64
    reference = pipe(prompt_embeds=emb[:1], negative_prompt_embeds=emb[1:], height=size, width=size, num_frames=5,
                     guidance_scale=3.0, num_latent_frames_per_chunk=2, pyramid_num_inference_steps_list=steps,
                     history_sizes=[2, 1, 1], generator=torch.Generator("cpu").manual_seed(3),
                     output_type="latent", return_dict=False)[0]

    class Stand(torch.nn.Module):  # the route's transformer call: hidden states, timestep, text, history
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False, **history):
            return (guided_velocity(hidden_states, timestep, encoder_hidden_states),)

    experts = [Expert(Stand(), 3.0)]
    s = pipe.vae_scale_factor_spatial
    generator = torch.Generator("cpu").manual_seed(3)
    noise = randn_tensor((1, 16, 2, size // s, size // s), generator=generator, dtype=torch.float32)
    history = route.make_history(torch.zeros(1, 16, 1, size // s, size // s), None, route.Sizes(2, 1, 1))
    denoise = route.denoiser(experts, history, emb[:1], emb[1:], zero_star=True)
    ours = sample_pyramid(denoise, noise, HeliosScheduler(stages=3, scheduler_type="euler", use_dynamic_shifting=True),
                          steps, tuple(pipe.transformer.config.patch_size), generator, zero=route.zero_init(experts, emb[1:]))
    torch.testing.assert_close(ours, reference.float(), rtol=1e-4, atol=1e-4)
    # and CFG-Zero* matters here: plain CFG from the same noise (the same draws after it) gives other latents
    generator = torch.Generator("cpu").manual_seed(3)
    randn_tensor(noise.shape, generator=generator, dtype=torch.float32)
    plain = sample_pyramid(route.denoiser(experts, history, emb[:1], emb[1:]), noise, HeliosScheduler(
        stages=3, scheduler_type="euler", use_dynamic_shifting=True), steps, tuple(pipe.transformer.config.patch_size),
        generator)
    assert float((plain - reference).abs().max()) > 1e-2


def test_the_builtin_dit_runs_helios_pyramid_stages_on_request(tiny_story):
    """A model without a Helios scheduler (the built-in DiT through its Helios LoRA) takes the stages
    from the route option, on a HeliosScheduler built on the story's shift."""
    from cliploom.engine import Engine

    engine = Engine.load("builtin")
    seen = []
    tr = __import__("cliploom.models.helios", fromlist=["helios_of"]).helios_of(engine.model).transformer
    hook = tr.register_forward_pre_hook(lambda m, a, kw: seen.append(tuple(kw["hidden_states"].shape[-2:])),
                                        with_kwargs=True)
    try:
        clips = list(engine.generate(tiny_story(2, width=32, height=32, frames=17, steps=4, route="helios",
                                                route_options={"stages": 2}), progress=False))
    finally:
        hook.remove()
    h = 32 // engine.model.scale_spatial
    assert {(h // 2, h // 2), (h, h)} == set(seen)
    assert [len(c.frames) for c in clips] == [17, 12]
