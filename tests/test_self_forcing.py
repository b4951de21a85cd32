"""The Self-Forcing stage: the causal student trained on its own rollouts by DMD (route self-forcing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cliploom.errors import CliploomError
from cliploom.train.config import config_from_dict

CAUSAL_LORA = "src/cliploom/shapesworld/model/causal_lora.safetensors"


def _config(tmp_path, **over):
    keys = dict(model="builtin", route="self-forcing", out_dir=str(tmp_path / "run"), rank=64, alpha=64,
                init_lora=CAUSAL_LORA, error_recycling=False, batch_size=1, steps=4, critic_ratio=2,
                clips_per_sample=2, motion_latents=[1], checkpoint_every=2, lr=1e-3, critic_lr=1e-3)
    return config_from_dict({**keys, **over})


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from cliploom.train.self_forcing import SelfForcingTrainer

    return SelfForcingTrainer(_config(tmp_path_factory.mktemp("sf")), progress=False)


def test_the_students_rollout_is_what_the_route_generates(trainer, tmp_path):
    """With the exit step at the last step, a rollout is the self-forcing route's own generation with
    the Euler sampler the rollout uses (the same loop, noise, cache and model in the same process:
    equal within float rounding of the separately written rollout, 1e-5 of the latents' scale). The
    route itself samples with renoise by default (measured better for the student, docs/routes.md)."""
    from PIL import Image

    from cliploom.routes.causal import weave
    from cliploom.story import ClipSpec, make_story
    from cliploom.train.self_forcing import RolloutChoice

    g = torch.Generator().manual_seed(3)
    r = trainer.draw_rollout(g)
    r.choice = RolloutChoice(2, trainer.cfg.student_steps - 1)
    from cliploom.shapesworld import sample_sequence

    ref = tmp_path / "ref.png"
    story = make_story(clips=[ClipSpec(p) for p in r.prompts], reference=ref, mode="pro", seed=11, motion_latents=1,
                       frames=17, route="self-forcing", color_match="none", seam_blend=0, sampler="euler")
    # the rollout's anchor is the story's reference image
    image = sample_sequence(0, 1, [17], size=32).frames(0, 1)
    Image.fromarray(image[0]).save(ref)
    from cliploom.models.components import frames_to_tensor

    r.anchor = trainer.model.encode_video(frames_to_tensor(image))
    resolved = story.resolve(trainer.model.settings, trainer.model.size_multiple, trainer.model.scale_temporal)
    assert resolved.steps == 4 and resolved.guidance == 1.0  # the route's sampling settings
    default = make_story(clips=[ClipSpec("x")], reference=ref, route="self-forcing")
    assert default.resolve(trainer.model.settings, trainer.model.size_multiple, trainer.model.scale_temporal).sampler == "renoise"
    hw = 32 // trainer.model.scale_spatial
    noises = [torch.randn((1, trainer.model.z_dim, n, hw, hw), generator=torch.Generator("cpu").manual_seed(story.clip_seed(i)))
              for i, n in enumerate((4, 3))]
    trainer.transformer.eval()
    try:
        with torch.no_grad():
            trainer.roll_out(r, g, grad=False, noises=noises)
        clips = list(weave(trainer.model, story, progress=False))
    finally:
        trainer.transformer.train()
    assert [n.shape[2] for n in r.new] == [4, 3]
    for clip, new in zip(clips, r.new):
        scale = float(new.abs().max())
        assert (clip.memory - new[:, :, -1:]).abs().max() <= 1e-5 * scale


def test_a_step_trains_the_student_and_the_critic_and_the_checkpoint_keeps_the_critic(trainer, tmp_path):
    from safetensors.torch import load_file

    from cliploom.train.adapter import lora_state
    from cliploom.train.self_forcing import CRITIC_FILE, SelfForcingTrainer

    student = {k: v.clone() for k, v in trainer.lora_state().items()}
    critic = {k: v.clone() for k, v in lora_state(trainer.critic.transformer).items()}
    teacher = {n: p.detach().clone() for n, p in trainer.teacher.transformer.named_parameters()}
    info = trainer.train_step()
    assert np.isfinite(info.loss) and np.isfinite(info.critic_loss) and info.grad_norm > 0
    assert "self-forcing rollout of 2 clips" in info.modes[0]
    assert any(not torch.equal(v, student[k]) for k, v in trainer.lora_state().items())
    assert any(not torch.equal(v, critic[k]) for k, v in lora_state(trainer.critic.transformer).items())
    assert all(torch.equal(p, teacher[n]) for n, p in trainer.teacher.transformer.named_parameters())  # frozen
    # the critic starts as the teacher (its LoRA's B is zero): only training moves it
    assert all(float(v.abs().max()) == 0 for k, v in critic.items() if "lora_B" in k)

    folder = trainer.save_checkpoint()
    saved = load_file(str(folder / CRITIC_FILE))
    now = lora_state(trainer.critic.transformer)
    assert saved.keys() == now.keys() and all(torch.equal(saved[k], now[k]) for k in saved)  # float32 written as is
    resumed = SelfForcingTrainer(trainer.cfg, resume=True, progress=False)
    assert resumed.step == trainer.step
    again = lora_state(resumed.critic.transformer)
    assert all(torch.equal(again[k], now[k]) for k in now)  # read back from the file: exact


@pytest.mark.parametrize("over, message", [
    ({"error_recycling": True}, "not on recycled errors"),
    ({"init_lora": None}, "starts the student from a causal stage-1 LoRA"),
    ({"batch_size": 2}, "one story per step"),
    ({"critic_ratio": 0}, "critic_ratio"),
    ({"data": "videos", "videos": "x"}, "ShapesWorld stories only"),
])
def test_self_forcing_settings_are_checked(tmp_path, over, message):
    with pytest.raises(CliploomError, match=message):
        _config(tmp_path, **over)
