"""Story files: parsing, seeds, frame arithmetic and validation errors."""

from pathlib import Path

import pytest

from cliploom.errors import CliploomError
from cliploom.story import ClipSpec, cycle_prompts, load_story, make_story

GOOD = """
reference: ref.png
mode: pro
frames: 33
motion_latents: 2
steps: 8
guidance: 4.5
seed: 7
style: "cinematic,"
loras:
  - {path: svi.safetensors, weight: 0.8, expert: high}
clips:
  - a red circle moves left
  - {prompt: a red circle bounces, repeat: 2}
  - {prompt: a red circle stays still, seed: 99}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "story.yaml"
    p.write_text(text)
    return p


def test_parses_a_complete_story(tmp_path):
    s = load_story(write(tmp_path, GOOD))
    assert [c.prompt for c in s.clips] == [
        "a red circle moves left", "a red circle bounces", "a red circle bounces", "a red circle stays still"]
    assert s.reference == tmp_path / "ref.png" and s.loras[0].path == tmp_path / "svi.safetensors"
    assert s.loras[0].weight == 0.8 and s.loras[0].expert == "high" and s.loras[0].name == "svi"
    assert s.prompt(0) == "cinematic, a red circle moves left"
    assert s.clip_seed(3) == 99


def test_clip_seeds_are_deterministic_and_distinct(tmp_path):
    a, b = load_story(write(tmp_path, GOOD)), load_story(write(tmp_path, GOOD))
    seeds = [a.clip_seed(i) for i in range(3)]
    assert seeds == [b.clip_seed(i) for i in range(3)] and len(set(seeds)) == 3
    other = make_story(clips=a.clips, seed=8, frames=33)
    assert other.clip_seed(0) != a.clip_seed(0)


@pytest.mark.parametrize("clips, F, K", [(1, 33, 1), (5, 33, 1), (4, 81, 1), (3, 17, 2), (3, 33, 3)])
def test_latent_mode_frame_arithmetic(clips, F, K):
    s = make_story(clips=[ClipSpec("x")] * clips, frames=F, motion_latents=K)
    assert s.total_frames() == F + (clips - 1) * (F - 1 - 4 * K)


@pytest.mark.parametrize("mode, N", [("film", 5), ("shot", 1), ("svi2", 5)])
def test_pixel_mode_frame_arithmetic(mode, N):
    s = make_story(clips=[ClipSpec("x")] * 4, frames=33, mode=mode)
    assert s.motion_frames == N and s.total_frames() == 4 * (33 - N) + N


def test_prompts_cycle_when_there_are_more_clips():
    assert [c.prompt for c in cycle_prompts(["a", "b"], 5)] == ["a", "b", "a", "b", "a"]


BAD = [
    ("frames: 10\nclips: [a]", "frames 10 is not of the form 4k+1"),
    ("frames: 9\nmotion_latents: 2\nclips: [a]", "motion_latents 2 does not fit"),
    ("frames: 9\nmode: film\nmotion_frames: 9\nclips: [a]", "motion_frames 9 does not fit"),
    ("mode: warp\nclips: [a]", "unknown mode 'warp'"),
    ("clips: []", "no clips"),
    ("frames: 9", "no clips"),
    ("clips: [{prompt: ''}]", "clip 1 has no prompt"),
    ("clips: [a]\ncolour: red", "unknown keys ['colour']"),
    ("clips: [a]\nsteps: many", "steps must be a number"),
    ("clips: [a]\nloras: [{path: x.safetensors, expert: middle}]", "expert 'middle' is unknown"),
    ("clips: [a]\ntimesteps: [250, 500]", "must decrease strictly"),
    ("clips: [a]\nguidance: 0.5", "guidance 0.5 must be between 1 and 100"),
    ("clips: [a\n  b: c", "malformed YAML"),
    ("- just\n- a list", "a story must be a mapping"),
    ("clips: [{prompt: a, loras: {svi: 0.5}}]", "unknown LoRAs ['svi']"),
]


@pytest.mark.parametrize("text, message", BAD)
def test_bad_stories_fail_with_one_clear_line(tmp_path, text, message):
    with pytest.raises(CliploomError) as e:
        load_story(write(tmp_path, text))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert "; " in str(e.value)  # the problem, then the fix


def test_unreadable_story_file(tmp_path):
    with pytest.raises(CliploomError, match="story .*missing.yaml does not exist"):
        load_story(tmp_path / "missing.yaml")


def test_per_clip_lora_weights_need_unfused_loras(tmp_path):
    text = "loras: [{path: s.safetensors, name: svi}]\nclips: [{prompt: a, loras: {svi: 0.5}}]"
    with pytest.raises(CliploomError, match="fuse_loras: false"):
        load_story(write(tmp_path, text))
    s = load_story(write(tmp_path, text + "\nfuse_loras: false"))
    assert s.clips[0].lora_weights == {"svi": 0.5}


# -- the Python API: make_story takes what a story file takes ------------------------------------


def test_make_story_takes_plain_prompts_mappings_and_clipspecs(tmp_path):
    import cliploom
    from cliploom.story import LoraSpec

    plain = cliploom.make_story(reference=str(tmp_path / "ref.png"), clips=["a prompt", "another"])
    assert [c.prompt for c in plain.clips] == ["a prompt", "another"] and plain.reference == tmp_path / "ref.png"
    mixed = make_story(
        clips=["a", {"prompt": "b", "repeat": 2, "seed": 9, "loras": {"svi": 0.5}}, ClipSpec("c", seed=3)],
        loras=[str(tmp_path / "svi.safetensors"), {"path": tmp_path / "x.safetensors", "weight": 0.8},
               LoraSpec(tmp_path / "y.safetensors", 0.3, "high")],
        fuse_loras=False, model=tmp_path,
    )
    assert [(c.prompt, c.seed) for c in mixed.clips] == [("a", None), ("b", 9), ("b", 9), ("c", 3)]
    assert mixed.clips[1].lora_weights == {"svi": 0.5} and mixed.clip_seed(3) == 3
    assert [(lo.name, lo.weight, lo.expert) for lo in mixed.loras] == [("svi", 1.0, "both"), ("x", 0.8, "both"), ("y", 0.3, "high")]
    assert mixed.model == str(tmp_path)
    assert [c.prompt for c in make_story(prompts=["p", "q"]).clips] == ["p", "q"]  # the story file's other key


@pytest.mark.parametrize("values, message", [
    (dict(clips="a prompt"), "clips must be a list of prompts, got str"),
    (dict(clips=[]), "no clips"),
    (dict(clips=[3]), "clip 1 must be a prompt or a mapping"),
    (dict(clips=[{"prompt": "a", "colour": "red"}]), "clip 1 has unknown keys ['colour']"),
    (dict(clips=[ClipSpec(" ")]), "clip 1 has no prompt"),
    (dict(clips=["a"], frames="9"), "frames must be a number"),
    (dict(clips=["a"], frames=9.5), "frames must be a whole number"),
    (dict(clips=["a"], colour="red"), "unknown keys ['colour']"),
    (dict(clips=["a"], prompts=["b"]), "both prompts and clips"),
    (dict(clips=["a"], loras=[{"weight": 1.0}]), "lora 1 has no path"),
    (dict(clips=["a"], loras=[{"path": "x.safetensors", "weight": "high"}]), "lora 1 weight must be a number"),
    (dict(clips=["a"], steps=4, timesteps=[1000, 500]), "both steps and timesteps"),
    (dict(clips=["a"], reference=7), "reference must be a path"),
])
def test_make_story_checks_python_values_like_the_story_file(values, message):
    with pytest.raises(CliploomError) as e:
        make_story(**values)
    assert message in str(e.value) and "\n" not in str(e.value)
