"""y and mask construction, checked against tensors built by hand and against diffusers."""

import torch

from cliploom import conditioning as C


def test_latent_frame_count():
    assert [C.latent_frame_count(f) for f in (5, 9, 17, 33, 81)] == [2, 3, 5, 9, 21]


def test_mask_marks_first_pixel_frame_in_all_four_channels():
    m = C.pixel_frame_mask(9, 2, 3)  # 9 pixel frames -> 3 latent frames
    expected = torch.zeros(1, 4, 3, 2, 3)
    expected[:, :, 0] = 1  # pixel frame 0 repeated 4x fills latent frame 0
    assert torch.equal(m, expected)


def test_mask_packs_later_pixel_frames_in_groups_of_four():
    m = C.pixel_frame_mask(9, 1, 1, known_pixel_frames=3)  # pixel frames 0, 1, 2 known
    # latent frame 1 holds pixel frames 1..4 in channels 0..3: only 1 and 2 are known
    assert m[0, :, :, 0, 0].T.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]]


def test_mask_matches_diffusers_pipeline(tiny_models):
    model = tiny_models("wan22")
    image = torch.zeros(1, 3, 32, 32)
    _, cond = model.pipe.prepare_latents(image, 1, 16, 32, 32, 17, torch.float32, torch.device("cpu"))
    ours = C.pixel_frame_mask(17, 4, 4)
    assert torch.equal(cond[:, :4], ours)


def test_latent_motion_y_is_anchor_then_motion_then_zeros():
    anchor = torch.full((1, 2, 1, 2, 2), 1.0)
    motion = torch.stack([torch.full((1, 2, 2, 2), v) for v in (2.0, 3.0)], dim=2)  # K = 2
    y = C.latent_motion_y(anchor, motion, 5)
    expected = torch.zeros(1, 2, 5, 2, 2)
    expected[:, :, 0], expected[:, :, 1], expected[:, :, 2] = 1, 2, 3
    assert torch.equal(y, expected)
    first_clip = C.latent_motion_y(anchor, None, 5)
    assert torch.equal(first_clip[:, :, 0], anchor[:, :, 0]) and first_clip[:, :, 1:].abs().sum() == 0


def test_latent_condition_input_is_noisy_mask_y():
    anchor = torch.ones(1, 2, 1, 2, 2)
    motion = torch.full((1, 2, 1, 2, 2), 5.0)
    cond = C.latent_condition(anchor, motion, 3)
    x = torch.full((1, 2, 3, 2, 2), -7.0)
    inp = cond.model_input(x)
    assert inp.shape == (1, 2 + 4 + 2, 3, 2, 2)
    assert torch.equal(inp[:, :2], x)
    # the mask marks only the anchor (latent frame 0), not the motion latents
    assert inp[:, 2:6, 0].eq(1).all() and inp[:, 2:6, 1:].eq(0).all()
    assert torch.equal(inp[:, 6:, 0], anchor[:, :, 0]) and torch.equal(inp[:, 6:, 1], motion[:, :, 0])
    assert inp[:, 6:, 2].eq(0).all()
    assert torch.equal(cond.timestep(500.0, x), torch.tensor([500.0]))


def _frames(*values, h=2, w=2):
    return torch.stack([torch.full((1, 3, h, w), float(v)) for v in values], dim=2)


def test_pixel_motion_video_padding_modes():
    ref = torch.full((1, 3, 2, 2), 0.5)
    motion = _frames(0.25, 0.75)  # N = 2 (values exact in float32)
    got = lambda pad: C.pixel_motion_video(ref, motion, 6, pad)[0, 0, :, 0, 0].tolist()  # noqa: E731
    assert got(-1) == [0.25, 0.75, 0.5, 0.5, 0.5, 0.5]  # the reference repeated
    assert got(0) == [0.25, 0.75, 0.0, 0.0, 0.0, 0.0]  # zeros
    assert got(2) == [0.25, 0.75, 0.5, 0.5, 0.0, 0.0]  # k reference frames, then zeros
    first = C.pixel_motion_video(ref, None, 4, 0)[0, 0, :, 0, 0].tolist()
    assert first == [0.5, 0.0, 0.0, 0.0]  # clip 0 starts with the reference itself


def test_ti2v_clean_frames_and_per_token_timesteps():
    clean = torch.randn(1, 3, 3, 4, 4)
    cond = C.latent_condition(clean[:, :, :1], clean[:, :, 1:2], 3, expand_timesteps=True)
    x = torch.zeros(1, 3, 3, 4, 4)
    inp = cond.model_input(x)
    assert inp.shape == x.shape  # no y channels
    assert torch.equal(inp[:, :, :2], clean[:, :, :2]) and inp[:, :, 2].eq(0).all()
    ts = cond.timestep(700.0, x)  # 4 tokens per latent frame with a 2x2 patch
    assert ts.tolist() == [[0.0] * 8 + [700.0] * 4]
    assert torch.equal(cond.finish(torch.ones_like(x))[:, :, :2], clean[:, :, :2])


def test_pixel_condition_on_ti2v_knows_latent_frames_covered_by_motion():
    lat = torch.randn(1, 3, 4, 2, 2)
    assert C.pixel_condition(lat, 13, motion_frames=1, expand_timesteps=True).known[0, 0, :, 0, 0].tolist() == [1, 0, 0, 0]
    assert C.pixel_condition(lat, 13, motion_frames=5, expand_timesteps=True).known[0, 0, :, 0, 0].tolist() == [1, 1, 0, 0]


def test_repeat_for_guidance_keeps_condition():
    cond = C.latent_condition(torch.ones(1, 2, 1, 2, 2), None, 3)
    cond.image_embeds = torch.ones(1, 5, 8)
    r = cond.repeat(2)
    assert r.y.shape[0] == 2 and r.image_embeds.shape[0] == 2 and torch.equal(r.y[1], cond.y[0])


def test_amplify_motion_scales_free_frames_around_the_last_known_one_and_keeps_their_means():
    g = torch.Generator().manual_seed(0)
    anchor, motion = torch.randn(1, 2, 1, 3, 3, generator=g), torch.randn(1, 2, 1, 3, 3, generator=g)
    end = torch.randn(1, 2, 1, 3, 3, generator=g)
    cond = C.latent_condition(anchor, motion, 5, keyframes=((16, end),))  # y = [anchor, motion, 0, 0, end]
    cond.y[:, 4:, 2] = torch.randn(1, 2, 3, 3, generator=g)  # a free frame with content of its own
    before = cond.y.clone()
    assert C.amplify_motion(cond, 1.0, 2) is cond and torch.equal(cond.y, before)  # 1 = off
    C.amplify_motion(cond, 1.5, 2)
    y0, y1 = before[:, 4:], cond.y[:, 4:]
    assert torch.equal(cond.y[:, :4], before[:, :4])  # the mask is untouched
    assert torch.equal(y1[:, :, :2], y0[:, :, :2]) and torch.equal(y1[:, :, 4], y0[:, :, 4])  # known: anchor, motion, end
    base = y0[:, :, 1:2]
    for t in (2, 3):
        d0, d1 = y0[:, :, t] - base[:, :, 0], y1[:, :, t] - base[:, :, 0]
        assert torch.allclose(d1.mean(), d0.mean(), atol=1e-6)  # each frame's mean difference is kept
        assert torch.allclose(d1 - d1.mean(), 1.5 * (d0 - d0.mean()), atol=1e-6)  # the rest scaled
    ti2v = C.latent_condition(anchor, motion, 5, expand_timesteps=True)
    clean = ti2v.clean.clone()
    assert torch.equal(C.amplify_motion(ti2v, 1.5, 2).clean, clean)  # no y: nothing to amplify
