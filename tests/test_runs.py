"""Run folders (cliploom.runs): resume after a crash, re-run from clip N, extend; every clip
checkpointed atomically. Same machine, same path: the frames are compared exactly, because
"a resumed run gives the clips of an uninterrupted one" is the product's claim (tests/compare.py)."""

import json

import numpy as np
import pytest

from cliploom.engine import Engine
from cliploom.errors import CliploomError
from cliploom.runs import Run
from cliploom.story import ClipSpec
from cliploom.video_io import read_video


class Crash(KeyboardInterrupt):
    """What a kill looks like from inside: the run stops between two clips or steps."""


def render(engine, story, out, **kw):
    return engine.render(story, out, progress=False, **kw)


def crash_at(clip: int, step: int | None = None):
    """``on_clip_start`` / ``on_step`` hooks that stop the run at ``clip`` (and ``step``)."""
    if step is None:
        def hook(i):
            if i == clip:
                raise Crash()
        return {"on_clip_start": hook}

    def on_step(i, k, steps):
        if (i, k) == (clip, step):
            raise Crash()
    return {"on_step": on_step}


@pytest.fixture(scope="module")
def engine(tiny_models):
    return Engine(tiny_models("wan22"))


@pytest.mark.parametrize("mode, out_name", [("pro", "v.mp4"), ("film", "v.mp4"), ("pro", "frames/")])
def test_resume_after_a_crash_gives_the_uninterrupted_video(engine, tiny_story, tmp_path, mode, out_name):
    story = tiny_story(4, mode=mode, **({"motion_frames": 2} if mode == "film" else {}))
    whole = render(engine, story, tmp_path / "whole" / out_name)
    out = tmp_path / "split" / out_name
    with pytest.raises(Crash):
        render(engine, story, out, **crash_at(2, step=2))  # in clip 2's last step
    assert not out.exists()
    with pytest.raises(CliploomError, match="holds 2 finished clips.*--resume"):
        render(engine, story, out)
    report = render(engine, story, out, resume=True)
    assert report["resumed_at_clip"] == 2 and report["totals"]["frames"] == whole["totals"]["frames"]
    assert [c["frames_kept"] for c in report["clips"]] == [c["frames_kept"] for c in whole["clips"]]
    assert np.array_equal(read_video(out), read_video(tmp_path / "whole" / out_name))


def test_a_re_anchored_run_resumes_on_the_frame_it_kept(engine, tiny_story, tmp_path):
    """``anchor: last_frame``: each clip's checkpoint keeps the frame the next clip is anchored on, so
    a resumed run gives the uninterrupted video (same path: exact); a folder without that frame
    (written before it was kept) is refused in one line."""
    from safetensors.torch import load_file, save_file

    story = tiny_story(4, anchor="last_frame")
    whole = render(engine, story, tmp_path / "whole" / "v.mp4")
    out = tmp_path / "split" / "v.mp4"
    with pytest.raises(Crash):
        render(engine, story, out, **crash_at(2, step=1))
    kept = Run(out.parent / "v.run").clips_dir / "000001.memory.safetensors"
    assert load_file(str(kept))["anchor_next"].shape == (32, 32, 3)
    with pytest.raises(CliploomError, match="the story's anchor changed since the run"):  # keyed only when set
        render(engine, tiny_story(4), out, resume=True)
    report = render(engine, story, out, resume=True)
    assert report["resumed_at_clip"] == 2 and report["totals"]["frames"] == whole["totals"]["frames"]
    assert np.array_equal(read_video(out), read_video(tmp_path / "whole" / "v.mp4"))
    save_file({"memory": load_file(str(kept))["memory"]}, str(kept))  # as a run folder from before
    entry_path = kept.parent / "000001.json"
    entry = json.loads(entry_path.read_text())
    entry["files"][kept.name] = kept.stat().st_size  # a whole checkpoint, only without the frame
    entry_path.write_text(json.dumps(entry))
    with pytest.raises(CliploomError, match="cannot continue at clip 2.*does not keep"):
        render(engine, story, out, from_clip=2)


def test_a_run_with_the_memory_encoded_from_frames_resumes_on_that_memory(engine, tiny_story, tmp_path):
    """``memory_from: frames``: each checkpoint keeps the memory as it was encoded from the clip's frames,
    so a resumed run gives the uninterrupted video (same path: exact); resuming a run with the other
    memory (a folder written before the setting, whose memory is the denoised latents) is refused."""
    story = tiny_story(4, memory_from="frames")
    whole = render(engine, story, tmp_path / "whole" / "v.mp4")
    out = tmp_path / "split" / "v.mp4"
    with pytest.raises(Crash):
        render(engine, story, out, **crash_at(2, step=1))
    with pytest.raises(CliploomError, match="the story's memory_from changed since the run"):
        render(engine, tiny_story(4), out, resume=True)
    report = render(engine, story, out, resume=True)
    assert report["resumed_at_clip"] == 2 and report["totals"]["frames"] == whole["totals"]["frames"]
    assert np.array_equal(read_video(out), read_video(tmp_path / "whole" / "v.mp4"))


def test_a_torn_checkpoint_is_never_read(engine, tiny_story, tmp_path):
    story = tiny_story(4)
    render(engine, story, tmp_path / "w.mp4")
    whole = read_video(tmp_path / "w.mp4")
    out = tmp_path / "v.mp4"
    with pytest.raises(Crash):
        render(engine, story, out, **crash_at(3))
    clips = tmp_path / "v.run" / "clips"
    # A crash while clip 2 was being written: its memory half there, its JSON still a .partial.
    memory = clips / "000002.memory.safetensors"
    memory.write_bytes(memory.read_bytes()[: memory.stat().st_size // 2])
    (clips / "000003.json.partial").write_text('{"index": 3, "files": {')
    assert [c.index for c in Run(tmp_path / "v.run").saved()] == [0, 1]
    report = render(engine, story, out, resume=True)
    assert report["resumed_at_clip"] == 2
    assert np.array_equal(read_video(out), whole)


def test_from_clip_keeps_earlier_clips_byte_for_byte_and_remakes_the_rest(engine, tiny_story, tmp_path):
    first = tiny_story(3)
    out = tmp_path / "v.mp4"
    render(engine, first, out)
    before = {p.name: p.read_bytes() for p in (tmp_path / "v.run" / "clips").glob("00000[01].mp4")}
    second = tiny_story(3)
    second.clips = first.clips[:2] + [ClipSpec("a new prompt", seed=42), ClipSpec("one more")]
    report = render(engine, second, out, from_clip=2)
    assert report["resumed_at_clip"] == 2 and [c["prompt"] for c in report["clips"]][2:] == ["a new prompt", "one more"]
    after = {p.name: p.read_bytes() for p in (tmp_path / "v.run" / "clips").glob("00000[01].mp4")}
    assert after == before
    uninterrupted = render(engine, second, tmp_path / "u.mp4")
    assert np.array_equal(read_video(out), read_video(tmp_path / "u.mp4"))
    assert report["totals"]["frames"] == uninterrupted["totals"]["frames"] == 9 + 3 * 4


def test_extending_a_pixel_mode_run_drops_the_old_last_clips_tail(engine, tiny_story, tmp_path):
    """Pixel modes: a finished video's last clip keeps its last N frames; once a clip follows it,
    that clip regenerates them, exactly as in a story that was longer from the start."""
    short = tiny_story(2, mode="film", motion_frames=2)
    out = tmp_path / "v.mp4"
    assert render(engine, short, out)["totals"]["frames"] == 7 + 9
    longer = tiny_story(3, mode="film", motion_frames=2)
    report = render(engine, longer, out, from_clip=2)
    render(engine, longer, tmp_path / "u.mp4")
    assert report["totals"]["frames"] == 7 + 7 + 9
    assert np.array_equal(read_video(out), read_video(tmp_path / "u.mp4"))


def test_what_cannot_continue_is_named(engine, tiny_story, tmp_path):
    out = tmp_path / "v.mp4"
    with pytest.raises(CliploomError, match="no run to continue"):
        render(engine, tiny_story(2), out, resume=True)
    render(engine, tiny_story(2), out)
    with pytest.raises(CliploomError, match=r"steps changed since the run \(2 -> 3\)"):
        render(engine, tiny_story(2, steps=3), out, resume=True)
    changed = tiny_story(2)
    changed.clips = [changed.clips[0], ClipSpec("something else")]
    with pytest.raises(CliploomError, match="clip 1 changed since the run.*--from-clip 1"):
        render(engine, changed, out, resume=True)
    with pytest.raises(CliploomError, match="--from-clip 5 but the run has 2 finished clips"):
        render(engine, tiny_story(6), out, from_clip=5)
    with pytest.raises(CliploomError, match="run wrote MP4 segments"):  # v.mp4's run, asked for PNGs
        Run(tmp_path / "v.run", png=True).prepare(tiny_story(2).resolve(engine.model.settings), engine.model, resume=True)
    assert render(engine, tiny_story(2), out, overwrite=True)["resumed_at_clip"] is None


def test_cli_resume_and_from_clip(tiny_dirs, reference_png, tmp_path, capsys):
    from cliploom.cli import main

    story = tmp_path / "s.yaml"
    base = dict(reference=str(reference_png), model=str(tiny_dirs["wan22"]), frames=9, steps=2, seed=3,
                clips=["a", "b", "c"])
    story.write_text(json.dumps(base))
    out = tmp_path / "v.mp4"
    args = ["generate", str(story), "--out", str(out), "-q"]
    assert main(args) == 0
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0 and "clips 0..2 kept" in capsys.readouterr().out
    story.write_text(json.dumps({**base, "clips": ["a", "b", "z", "y"]}))
    assert main(args + ["--resume"]) == 2 and "--from-clip 2" in capsys.readouterr().err
    assert main(args + ["--from-clip", "2"]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["totals"]["clips"] == 4
