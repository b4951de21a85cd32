"""Block-causal attention with a KV cache (cliploom.models.causal) against dense masked attention."""

import pytest
import torch

from cliploom.models.causal import causal_attention, set_offset


def _inputs(model, frames, seed=0):
    tr = model.transformer
    g = torch.Generator().manual_seed(seed)
    h = w = 4
    x = torch.randn(1, tr.config.in_channels, frames, h, w, generator=g)
    text = model.encode_text(["a red circle moves right"])[0:1]
    return tr, x, text


def _run(tr, x, t, text):
    with torch.no_grad():
        return tr(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]


@pytest.mark.parametrize("sizes", [[1, 1, 1, 1], [1, 2, 1], [2, 2]])
def test_cached_blocks_equal_dense_block_causal_attention(tiny_models, sizes):
    model = tiny_models("wan22")
    tr, x, text = _inputs(model, sum(sizes))
    hw = (x.shape[3] // 2) * (x.shape[4] // 2)
    # per-token timesteps: earlier blocks clean (t = 0), the last block noisy
    per_frame = torch.cat([torch.zeros(sum(sizes[:-1])), torch.full((sizes[-1],), 700.0)])
    with causal_attention(tr) as session:
        session.set_blocks(sizes, hw)
        dense = _run(tr, x, per_frame.repeat_interleave(hw)[None], text)
        session.reset()
        outs, start = [], 0
        for i, n in enumerate(sizes):
            set_offset(tr, start)
            t = torch.tensor([700.0 if i == len(sizes) - 1 else 0.0])
            if i < len(sizes) - 1:
                with session.writing(n):
                    outs.append(_run(tr, x[:, :, start:start + n], t, text))
            else:
                outs.append(_run(tr, x[:, :, start:start + n], t, text))
            start += n
        set_offset(tr, 0)
    cached = torch.cat(outs, dim=2)
    # float32 sums in another order (a different batch of keys per call): within 1e-5 of the output's scale
    scale = dense.abs().max()
    assert (cached - dense).abs().max() <= 1e-5 * scale
    # and causality is real: the dense output of the first block does not change with later frames
    with causal_attention(tr) as session:
        session.set_blocks(sizes, hw)
        y = x.clone()
        y[:, :, sizes[0]:] += 1.0
        changed = _run(tr, y, per_frame.repeat_interleave(hw)[None], text)
    assert (changed[:, :, :sizes[0]] - dense[:, :, :sizes[0]]).abs().max() <= 1e-5 * scale
    assert (changed[:, :, sizes[0]:] - dense[:, :, sizes[0]:]).abs().max() > 1e-3 * scale
    # the model's own processors and RoPE are back
    assert type(tr.rope).__name__ == "WanRotaryPosEmbed"
    assert all(type(b.attn1.processor).__name__ != "BlockCausalProcessor" for b in tr.blocks)


def test_cache_keeps_the_sink_and_the_window_only(tiny_models):
    model = tiny_models("wan22")
    tr, x, text = _inputs(model, 1)
    hw = 4
    with causal_attention(tr, sink=2, window=3) as session:
        session.reset()
        sizes = []
        for i in range(9):
            set_offset(tr, i)
            with session.writing(1):
                _run(tr, x, torch.tensor([0.0]), text)
            sizes.append(session.cached_frames())
            assert session.cached_tokens() == session.cached_frames() * hw
        assert [b.start for b in session.blocks] == [0, 1, 6, 7, 8]  # frames 0-1 (sink) and the last 3
    assert sizes == [1, 2, 3, 4, 5, 5, 5, 5, 5]


def _frames_of(model, story, **kw):
    from cliploom.routes.causal import weave

    return list(weave(model, story, progress=False, **kw))


def test_causal_route_streams_the_pro_timeline_with_a_bounded_cache(tiny_models, tiny_story, monkeypatch):
    from cliploom.routes import causal as route

    model = tiny_models("wan21")
    sessions, cached, texts = [], [], []
    real_attention, real_denoiser = route.causal_attention, route.make_denoiser

    def attention(*a, **k):
        cm = real_attention(*a, **k)
        session = cm.__enter__()
        sessions.append(session)

        class Wrapped:
            def __enter__(self):
                return session

            def __exit__(self, *exc):
                return cm.__exit__(*exc)

        return Wrapped()

    monkeypatch.setattr(route, "causal_attention", attention)
    monkeypatch.setattr(route, "make_denoiser", lambda e, c, t, n: texts.append(t) or real_denoiser(e, c, t, n))
    story = tiny_story(6, frames=13, route="causal", route_options={"sink": 1, "window": 1})
    clips = _frames_of(model, story, on_clip_start=lambda i: cached.append(sessions[-1].cached_frames()))
    assert [len(c.frames) for c in clips] == [13, 8, 8, 8, 8, 8]  # pro's geometry: 4 latents, then 2 new a clip
    # sink: clip 0's 4 latents; window: one clip's 2 new latents -> never more than 6 frames cached
    assert cached == [1, 4, 6, 6, 6, 6] and sessions[-1].cached_frames() == 6
    assert sessions[-1].cached_tokens() == 6 * 4
    # every clip's blocks were denoised with that clip's own prompt (tiny_story alternates two)
    prompts = [story.prompt(i) for i in range(6)]
    emb = {p: model.encode_text([p])[0:1] for p in set(prompts)}
    per_clip = [texts[0:3], *[texts[3 + 2 * k: 5 + 2 * k] for k in range(5)]]  # 3 blocks in clip 0, 2 after
    for p, used in zip(prompts, per_clip):
        # encoded alone here, in a batch of two prompts by the loop: another path, so a tolerance (float32
        # sums over a batch may round differently); the other prompt's embedding is far away
        assert all(torch.allclose(t, emb[p], atol=1e-5) for t in used)
        assert all(not torch.allclose(t, emb[q], atol=1e-3) for t in used for q in emb if q != p)
    # decoded as pro decodes: [anchor, previous clip's last latent, new]
    for prev, clip in zip(clips, clips[1:]):
        assert torch.equal(clip.latents[:, :, 1], prev.latents[:, :, -1])
    again = _frames_of(model, story)
    assert all(torch.equal(a.frames, b.frames) for a, b in zip(again, clips))  # same path, same seed: same frames


def test_causal_options_change_what_they_should(tiny_models, tiny_story):
    model = tiny_models("wan21")
    base = _frames_of(model, tiny_story(3, frames=13, route="causal"))
    blocks = _frames_of(model, tiny_story(3, frames=13, route="causal", route_options={"block": 2}))
    assert [len(c.frames) for c in blocks] == [len(c.frames) for c in base]
    assert (blocks[0].frames.int() - base[0].frames.int()).abs().max() > 0  # two frames denoised together
    jittered = _frames_of(model, tiny_story(3, frames=13, route="causal", route_options={"rope_jitter": 0.8}))
    assert not torch.equal(jittered[0].latents, base[0].latents)
    recached = _frames_of(model, tiny_story(3, frames=13, route="causal", route_options={"recache": True}))
    assert torch.equal(recached[0].frames, base[0].frames)  # nothing to re-cache before the first switch
    # the prompts alternate: clip 1 attends to keys and values recomputed under its prompt (on a random
    # model the text barely moves them; any change is the re-cache, the path being otherwise the same)
    assert not torch.equal(recached[1].latents, base[1].latents)


def test_causal_route_refusals(tiny_models, tiny_dirs, tiny_story, reference_png):
    from cliploom.engine import Engine
    from cliploom.errors import CliploomError
    from cliploom.loom import Start

    with pytest.raises(CliploomError, match="has no causal weights"):
        list(Engine.load(tiny_dirs["wan21"], device="cpu").generate(tiny_story(1, route="causal"), progress=False))
    with pytest.raises(CliploomError, match="cannot resume"):
        _frames_of(tiny_models("wan21"), tiny_story(2, route="causal"), start=Start(1, torch.zeros(1, 16, 1, 4, 4)))
    from cliploom.story import ClipSpec, Keyframe

    keyed = [ClipSpec("a"), ClipSpec("b", keyframes=(Keyframe(-1, reference_png),))]
    with pytest.raises(CliploomError, match="does not take keyframes"):
        _frames_of(tiny_models("wan21"), tiny_story(2, clips=keyed, route="causal"))
    with pytest.raises(CliploomError, match="has no padding frames"):
        _frames_of(tiny_models("wan21"), tiny_story(2, route="causal", motion_amplitude=1.2))
    with pytest.raises(CliploomError, match="two experts"):
        _frames_of(tiny_models("wan22"), tiny_story(2, route="causal"))
    with pytest.raises(CliploomError, match="route option window 0 is out of range"):
        tiny_story(2, route="causal", route_options={"window": 0})
    with pytest.raises(CliploomError, match="recache must be true or false"):
        tiny_story(2, route="causal", route_options={"recache": 1})


def test_shifted_rope_gives_stream_positions_and_grows_past_the_models_table():
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    from cliploom.models.causal import ShiftedRope

    big = WanRotaryPosEmbed(64, (1, 2, 2), 64)
    x = torch.zeros(1, 4, 14, 4, 4)
    full_cos, full_sin = big(x)  # positions 0..13
    short = ShiftedRope(WanRotaryPosEmbed(64, (1, 2, 2), 8))  # a table of 8 positions
    short.offset = 10
    cos, sin = short(torch.zeros(1, 4, 4, 4, 4))  # positions 10..13, beyond the table: it grows
    assert short.inner.max_seq_len >= 14
    assert torch.allclose(cos, full_cos[:, 10 * 4:]) and torch.allclose(sin, full_sin[:, 10 * 4:])


def test_dense_pass_with_per_clip_prompts_equals_streaming_each_clip_with_its_own(tiny_models):
    model = tiny_models("wan22")
    tr, x, _ = _inputs(model, 3)
    texts = model.encode_text(["a red circle moves right", "a blue square moves up"])
    hw = 4
    t = torch.zeros(3 * hw)[None]
    with causal_attention(tr, clip_texts=True) as session:
        session.set_blocks([1, 1, 1], hw)
        session.set_clip_texts([0, 0, 1], hw, texts.shape[1])
        dense = _run(tr, x, t, torch.cat([texts[0:1], texts[1:2]], dim=1))
    with causal_attention(tr) as session:
        session.reset()
        outs = []
        for f, clip in enumerate([0, 0, 1]):
            set_offset(tr, f)
            with session.writing(1):
                outs.append(_run(tr, x[:, :, f:f + 1], torch.zeros(1), texts[clip:clip + 1]))
        set_offset(tr, 0)
    cached = torch.cat(outs, dim=2)
    assert (cached - dense).abs().max() <= 1e-5 * dense.abs().max()


def test_causal_stage_one_trains_on_streams(tmp_path, tiny_dirs):
    import numpy as np

    from cliploom.errors import CliploomError
    from cliploom.models import load_model
    from cliploom.train.causal import CausalTrainer
    from cliploom.train.config import config_from_dict

    cfg = config_from_dict(dict(model=str(tiny_dirs["wan21"]), out_dir=str(tmp_path / "run"), rank=4, alpha=8,
                                frames=9, steps=2, batch_size=2, route="causal", clips_per_sample=3,
                                error_recycling=False, checkpoint_every=10, lr=0.02))
    trainer = CausalTrainer(cfg, model=load_model(tiny_dirs["wan21"], device="cpu"), progress=False)
    before = {n: p.detach().clone() for n, p in trainer.transformer.named_parameters() if p.requires_grad}
    for _ in range(2):
        info = trainer.train_step()
        assert np.isfinite(info.loss)
    s = info.samples[0]
    assert s.latents.shape[2] == 3 + 1 + 1 and s.clip_of_frame == [0, 0, 0, 1, 2]  # 9 frames: 3 latents, then 1 a clip
    assert len(s.prompts) == 3 and info.sigmas[:, 0].eq(0).all() and info.sigmas[:, 1:].gt(0).all()
    after = dict(trainer.transformer.named_parameters())
    assert any(not torch.equal(after[n], before[n]) for n in before)  # the LoRA learnt something
    assert all(type(b.attn2.processor).__name__ != "ClipTextProcessor" for b in trainer.transformer.blocks)
    for bad, message in (({"error_recycling": True}, "no error recycling"), ({"data": "videos", "videos": "x"},
                                                                               "ShapesWorld streams only")):
        with pytest.raises(CliploomError, match=message):
            config_from_dict(dict(model="builtin", route="causal", **{"error_recycling": False, **bad}))


def test_convert_takes_a_causal_checkpoints_ema_generator_to_safetensors(tmp_path, tiny_dirs, capsys):
    from safetensors.torch import load_file

    from cliploom.cli import main
    from real_layouts import diffusers_state, to_original_dit

    original = to_original_dit(diffusers_state(tiny_dirs["wan21"], "transformer"))
    ema = {k: v + 1 for k, v in original.items()}
    ckpt = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator": {f"model.{k}": v for k, v in original.items()},
                "generator_ema": {f"model.{k}": v for k, v in ema.items()}, "step": 600}, ckpt)
    out = tmp_path / "causal.safetensors"
    assert main(["convert", str(ckpt), "-o", str(out)]) == 0
    assert "from generator_ema" in capsys.readouterr().out
    got = load_file(str(out))
    assert got.keys() == ema.keys() and all(torch.equal(got[k], ema[k]) for k in ema)  # a copy, bit for bit
    assert main(["inspect", str(out)]) == 0
    assert "route: causal" in capsys.readouterr().out
    assert main(["convert", str(ckpt), "-o", str(tmp_path / "g.safetensors"), "--key", "generator"]) == 0
    assert torch.equal(load_file(str(tmp_path / "g.safetensors"))["head.head.weight"], original["head.head.weight"])


class _Payload:  # an object a weights-only load must refuse to build
    def __reduce__(self):
        return (print, ("code ran",))


@pytest.mark.parametrize("content, message", [
    ("code", "cannot be read as a weights-only PyTorch checkpoint"),
    ("nan", "holds NaN or Inf"),
    ("other", "is not a Wan DiT"),
    ("nothing", "no state dict found"),
])
def test_convert_refuses_in_one_line(tmp_path, capsys, content, message):
    from cliploom.cli import main

    ckpt = tmp_path / "x.pt"
    if content == "code":
        torch.save({"generator": {"blocks.0.self_attn.q.weight": torch.ones(2, 2)}, "x": _Payload()}, ckpt)
    elif content == "nan":
        torch.save({"blocks.0.self_attn.q.weight": torch.full((2, 2), float("nan"))}, ckpt)
    elif content == "other":
        torch.save({"encoder.conv.weight": torch.ones(2)}, ckpt)
    else:
        torch.save({"step": 3, "lr": 0.1}, ckpt)
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(ckpt), "-o", str(out)]) == 2
    err = capsys.readouterr()
    assert message in err.err and len(err.err.strip().splitlines()) == 1 and "code ran" not in err.out
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_inspect_names_the_route_of_a_diffusers_transformer_class():
    from cliploom.models.inspect import route_of_class

    assert [route_of_class(c) for c in ("WanTransformer3DModel", "SkyReelsV2Transformer3DModel",
                                        "HeliosTransformer3DModel", "CausalWanTransformer3DModel")] == \
        ["svi", "df", "helios", "causal"]


def test_rope_jitter_spreads_the_heads_temporal_frequencies_only():
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    from cliploom.models.causal import ShiftedRope

    rope = ShiftedRope(WanRotaryPosEmbed(64, (1, 2, 2), 64), heads=5)
    rope.offset = 3
    x = torch.zeros(1, 4, 2, 4, 4)
    cos0, sin0 = rope(x)
    rope.jitter = 0.4
    cos, sin = rope(x)
    t = rope.inner.t_dim
    assert cos.shape == (1, 8, 5, 64) and cos0.shape == (1, 8, 1, 64)
    # the middle head (e = 0) and every head's spatial part keep the model's rotation
    assert torch.allclose(cos[:, :, 2], cos0[:, :, 0], atol=1e-6) and torch.allclose(sin[:, :, 2], sin0[:, :, 0], atol=1e-6)
    assert torch.allclose(cos[..., t:], cos0[..., t:].expand_as(cos[..., t:]))
    # the outer heads turn at 0.6x and 1.4x the temporal rate: their angles differ from the model's
    assert (cos[:, :, 0, :t] - cos0[:, :, 0, :t]).abs().max() > 1e-2
    assert (cos[:, :, 4, :t] - cos[:, :, 0, :t]).abs().max() > 1e-2


def test_causal_route_streams_each_block_before_its_clip(tiny_models, tiny_story):
    """Per-block streaming: every block's frames arrive before their clip, and a clip's blocks put
    together are the clip (no colour match or seam blend to tell them apart): a streamed clip is
    decoded once, from its blocks."""
    from cliploom.routes.causal import weave

    model = tiny_models("wan21")
    story = tiny_story(3, frames=13, route="causal", color_match="none", seam_blend=0)
    events, blocks = [], {}
    clips = []
    for clip in weave(model, story, progress=False,
                      on_block=lambda i, f: events.append(("block", i, len(f))) or blocks.setdefault(i, []).append(f)):
        events.append(("clip", clip.index, len(clip.frames)))
        clips.append(clip)
    # clip 0: the anchor frame with the first block, then 4 frames a latent; later clips 2 latents each
    assert events == [("block", 0, 5), ("block", 0, 4), ("block", 0, 4), ("clip", 0, 13),
                      ("block", 1, 4), ("block", 1, 4), ("clip", 1, 8),
                      ("block", 2, 4), ("block", 2, 4), ("clip", 2, 8)]
    for clip in clips:
        # the clip's frames are the streamed frames themselves (copied, no arithmetic between: exact)
        assert torch.equal(torch.cat(blocks[clip.index]), clip.frames)
    plain = list(weave(model, story, progress=False))
    for a, b in zip(plain, clips):
        # streaming changes nothing in the latents (the same computations in the same process: exact)
        assert torch.equal(a.latents, b.latents)
        # a clip decoded whole against block by block: the same decoder operations frame by frame, the
        # post-quant 1x1x1 conv run per block instead of over the whole clip, so float rounding may
        # move a pixel by one uint8 level, never more
        assert (a.frames.int() - b.frames.int()).abs().max() <= 1


def test_only_the_causal_route_streams_blocks(tiny_dirs, tiny_story):
    from cliploom.engine import Engine
    from cliploom.errors import CliploomError

    engine = Engine.load(tiny_dirs["wan21"], device="cpu")
    with pytest.raises(CliploomError, match="only the causal routes stream blocks"):
        list(engine.generate(tiny_story(1), progress=False, on_block=lambda i, f: None))


def test_rebased_positions_stay_within_the_cache_where_absolute_ones_grow(tiny_models, tiny_story, monkeypatch):
    """``positions: rebased`` re-lays the cache from 0 at each clip: no forward runs past sink + window
    + one clip, where absolute positions grow with the video. While nothing is evicted the layout is
    already compact, nothing is rewritten and the clips are the absolute ones (same path: exact)."""
    from cliploom.errors import CliploomError
    from cliploom.routes import causal as route

    model = tiny_models("wan21")
    offsets = {}
    real = route.set_offset

    def record(tr, offset, key=None):
        offsets.setdefault(record.run, []).append(offset)
        real(tr, offset)

    monkeypatch.setattr(route, "set_offset", record)
    opts = {"sink": 1, "window": 1}
    for name in ("absolute", "rebased"):
        record.run = name
        _frames_of(model, tiny_story(6, frames=13, route="causal", route_options={**opts, "positions": name}))
    # 13 frames = 4 latents: the sink (clip 0 with its anchor) 4, the window 2, a clip 2 new latents
    assert max(offsets["absolute"]) == 4 + 5 * 2 - 1  # the last clip's last latent
    assert max(offsets["rebased"]) <= 4 + 2 + 2
    wide = {"sink": 1, "window": 16}  # nothing evicted in 3 clips: nothing to re-lay
    record.run = "wide"
    absolute = _frames_of(model, tiny_story(3, frames=13, route="causal", route_options=wide))
    rebased = _frames_of(model, tiny_story(3, frames=13, route="causal", route_options={**wide, "positions": "rebased"}))
    # no gap to close: rewrite_cache keeps every block as written and the same forwards run (same path: exact)
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(absolute, rebased))
    first = _frames_of(model, tiny_story(4, frames=13, route="causal", route_options={**opts, "positions": "rebased"}))
    narrow = _frames_of(model, tiny_story(4, frames=13, route="causal", route_options=opts))
    # the first gap in the cache opens when clip 2's latents push clip 1's out of the window
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(first[:3], narrow[:3]))
    assert not torch.equal(first[3].latents, narrow[3].latents)  # clip 3 sees its window at new positions
    with pytest.raises(CliploomError, match="positions must be one of absolute, rebased"):
        tiny_story(2, route="causal", route_options={"positions": "relative"})
