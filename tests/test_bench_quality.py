"""The quality benchmark: a truthful, varied dev set; aggregation; a small end-to-end smoke run."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_quality as bq  # noqa: E402
import check_base  # noqa: E402

from cliploom import evaluate as ev  # noqa: E402
from cliploom.shapesworld import parse_prompt  # noqa: E402
from cliploom.shapesworld.vocab import BACKGROUND_COLORS, SHAPES, SIZES, SUBJECT_COLORS  # noqa: E402


@pytest.fixture(scope="module")
def devs():
    return bq.dev_set(14, 20, 33)


def test_dev_set_is_deterministic_and_varied(devs):
    again = bq.dev_set(14, 20, 33)
    assert [d.prompts for d in devs] == [d.prompts for d in again]
    assert len(devs) == 14 and all(len(d.prompts) == 20 for d in devs)
    specs = [parse_prompt(d.prompts[0]) for d in devs]
    assert {s.color for s in specs} == set(SUBJECT_COLORS)
    assert {s.shape for s in specs} == set(SHAPES)
    assert {s.background for s in specs} == set(BACKGROUND_COLORS)
    assert {s.size for s in specs} == set(SIZES)
    assert any(s.striped for s in specs) and any(s.distractor for s in specs)
    for d in devs:
        parsed = [parse_prompt(p) for p in d.prompts]
        assert len({(p.color, p.shape, p.size, p.background, p.striped, p.distractor) for p in parsed}) == 1
        motions = [p.motion for p in parsed]
        assert all(a != b for a, b in zip(motions, motions[1:])), motions  # the prompt changes every clip
        assert len(set(motions)) >= 4


def test_reference_is_the_ground_truth_first_frame(devs):
    d = devs[3]  # has the gray block
    assert parse_prompt(d.prompts[0]).distractor
    ref = np.asarray(d.reference(32))
    assert np.array_equal(ref, d.ground_truth(size=32).frames(0, 1)[0])


@pytest.mark.parametrize("frames", [17, 33])
def test_dev_set_ground_truth_passes_the_evaluator(frames):
    """The world's own video of every dev story passes: the planned prompts are truthful."""
    for d in bq.dev_set(14, 20, frames)[::2] if frames == 33 else bq.dev_set(14, 20, frames)[1::3]:
        seq = d.ground_truth(size=32)
        assert seq.prompts == d.prompts
        scored = bq.score(seq.frames(), seq.prompts, seq.lengths)
        assert scored["passed"], (d.index, [c["failed"] for c in scored["clips"]])


def _clip(i, passed, de, jump, status="kept", motion=True):
    checks = {k: True for k in bq.CHECKS}
    checks.update(motion=motion, area=status == "kept", color=None if de is None else de <= 10,
                  boundary=None if jump is None else jump <= 4)
    return {"index": i, "color_delta_e": de, "background_delta_e": 1.0, "boundary_jump": jump,
            "sharpness_ratio": 1.0, "area_ratio": 1.0, "area_status": status, "checks": checks,
            "failed": [] if passed else ["color"], "passed": passed}


def test_aggregate_curves_and_rates():
    a = [_clip(0, True, 2.0, None), _clip(1, True, 4.0, 1.0), _clip(2, False, 12.0, 5.0)]
    b = [_clip(0, True, 4.0, None), _clip(1, False, None, 3.0, status="lost", motion=None), _clip(2, True, 6.0, 2.0)]
    stories = [{"passed": False, "clips": a}, {"passed": False, "clips": b}]
    agg = bq.aggregate(stories, 3)
    assert agg["curves"]["color_delta_e"]["mean"] == [3.0, 4.0, 9.0]
    assert agg["curves"]["color_delta_e"]["measured"] == [2, 1, 2]
    assert agg["curves"]["boundary_jump"]["mean"] == [None, 2.0, 3.5]
    assert agg["curves"]["pass_rate"] == [1.0, 0.5, 0.5]
    assert agg["curves"]["subject_kept"] == [1.0, 0.5, 1.0]
    assert agg["clip_pass_rate"] == round(4 / 6, 4) and agg["stories_clean"] == 0
    assert agg["clean_clips_mean"] == 1.5  # story a: 2 clean clips, story b: 1
    assert agg["checks"]["motion"] == {"pass_rate": 1.0, "measured": 5}
    assert agg["checks"]["color"]["pass_rate"] == 0.8
    assert agg["last_clip"]["color_delta_e"] == 9.0 and agg["last_window"]["boundary_jump"] == 2.75
    assert bq.reduction(2.0, 8.0) == 0.75 and bq.reduction(1.0, None) is None


def test_edge_moves_count_directed_moves_prompted_against_the_frame_edge():
    def move(motion, expected, ok):
        c = _clip(1, ok is not False, 1.0, 1.0, motion=ok)
        return c | {"motion": motion, "expected_displacement": expected}

    clips = [move("right", [0.2, 0.0], False), move("up", [0.0, -0.5], True), move("left", [-4.4, 0.0], False),
             move("still", [0.0, 0.0], False), move("down", [0.0, 0.9], None)]
    assert bq.edge_moves(clips) == {"measured": 2, "failed": 1}  # the free move, `still` and the unmeasured are out
    agg = bq.aggregate([{"passed": False, "clips": clips}], 5)
    assert agg["edge_moves"] == {"measured": 2, "failed": 1}


def test_snap_back_is_a_failed_move_towards_the_start():
    """Clip 1 moved right from the start; clip 2 was told to go up but went back left (a snap-back);
    clip 3 was told to go up, failed, and went further away (a failure, not a snap-back)."""
    cents = [[10.0 + 0.5 * f, 16.0] for f in range(10)]  # clip 0 (10 frames): right, 10 -> 14.5
    cents += [[14.5 - 0.3 * f, 16.0] for f in range(8)]  # clip 1: back left to 12.4
    cents += [[12.5 + 0.5 * f, 16.0] for f in range(8)]  # clip 2: right again, away from the start

    def clip(motion_ok, d, e):
        return {"checks": {"motion": motion_ok}, "displacement": d, "expected_displacement": e}

    result = {"size": [32, 32], "per_frame": {"centroid": cents},
              "clips": [clip(True, [4.5, 0], [4.5, 0]), clip(False, [-2.1, 0], [0, -3.5]), clip(False, [3.5, 0], [0, -3.5])]}
    assert bq.snap_backs(result, [10, 8, 8]) == [False, True, False]
    result["clips"][1]["checks"]["motion"] = True  # a move the prompt asked for is never a snap-back
    assert bq.snap_backs(result, [10, 8, 8])[1] is False
    at_start = dict(result, per_frame={"centroid": [[10.0, 16.0]] * 26})  # no direction to snap back in
    at_start["clips"][1]["checks"]["motion"] = False
    assert bq.snap_backs(at_start, [10, 8, 8])[1] is None


def test_ground_truth_has_no_snap_backs(devs):
    d = devs[0]
    seq = d.ground_truth(size=32)
    scored = bq.score(seq.frames(), seq.prompts, seq.lengths)
    assert [c["snap_back"] for c in scored["clips"]] == [False] * len(seq.prompts)
    agg = bq.aggregate([scored], len(seq.prompts))
    assert agg["snap_backs"] == 0 and agg["switched_motion_pass_rate"] == 1.0 and agg["first_clip_pass_rate"] == 1.0


def test_unmeasurable_video_fails_every_clip():
    blank = np.zeros((10, 32, 32, 3), np.uint8)
    prompt = "a big red circle stays still on a black background"
    scored = bq.score(blank, [prompt, prompt], [5, 5])
    assert not scored["passed"] and scored["error"] and all(c["failed"] == ["unmeasurable"] for c in scored["clips"])
    agg = bq.aggregate([{"passed": False, **scored}], 2)
    assert agg["clip_pass_rate"] == 0.0 and agg["curves"]["color_delta_e"]["mean"] == [None, None]


def test_update_keeps_other_sections(tmp_path):
    docs = tmp_path / "docs" / "benchmarks.md"
    docs.parent.mkdir()
    docs.write_text("# Benchmarks\n\n<!-- engine:start -->\nengine numbers\n<!-- engine:end -->\n")
    results = {"settings": {"clips": 2, "stories": 1, "frames": 9, "steps": 2, "guidance": 5.0, "width": 32,
                            "height": 32, "device": "cpu"},
               "model": {"path": "m", "kind": "model folder"}, "runs": {}}
    bq.write_markdown(results, "python benchmarks/bench_quality.py", docs, {"modes": "a.png", "ablation": "b.png"})
    bq.write_markdown(results, "python benchmarks/bench_quality.py --clips 2", docs, {"modes": "a.png", "ablation": "b.png"})
    text = docs.read_text()
    assert "engine numbers" in text and text.count("<!-- quality:start -->") == 1
    assert "--clips 2" in text


def _tiny_lora(path: Path, model_dir: Path, seed: int = 0) -> Path:
    """A small random LoRA (diffusers layout) on the tiny transformer's self-attention queries."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((model_dir / "transformer" / "config.json").read_text())
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(cfg["num_layers"]):
        for proj in ("to_q", "to_k", "to_v"):
            key = f"transformer.blocks.{i}.attn1.{proj}"
            state[f"{key}.lora_A.weight"] = torch.randn(4, dim, generator=g)
            state[f"{key}.lora_B.weight"] = torch.randn(dim, 4, generator=g)
    save_file(state, str(path))
    return path


@pytest.fixture
def model_with_svi_lora(tiny_dirs, tmp_path):
    """A copy of the tiny model that ships its own SVI LoRA (``svi_lora`` in cliploom.json)."""
    import shutil

    d = tmp_path / "model"
    shutil.copytree(tiny_dirs["wan21"], d)
    _tiny_lora(d / "svi.safetensors", d, seed=1)
    settings = json.loads((d / "cliploom.json").read_text())
    (d / "cliploom.json").write_text(json.dumps({**settings, "svi_lora": "svi.safetensors"}))
    return d


def test_smoke_run_writes_results_plots_and_docs(model_with_svi_lora, tmp_path, capsys):
    """1 story x 2 clips, every default mode plus a LoRA ablation, on a tiny random model."""
    lora = _tiny_lora(tmp_path / "er.safetensors", model_with_svi_lora)
    argv = ["--model", str(model_with_svi_lora), "--stories", "1", "--clips", "2", "--frames", "9", "--steps", "2",
            "--variant", "base=none", "--variant", "own=default", "--variant", f"ER={lora}",
            "--out-root", str(tmp_path), "--sheets", str(tmp_path / "sheets")]
    results = bq.main(argv)
    saved = json.loads((tmp_path / "benchmarks" / "results" / "quality.json").read_text())
    runs = saved["runs"]
    assert list(runs) == ["pro", "svi2", "chain", "naive", "pro-raw", "base", "own", "ER"]
    assert saved["dev_set"][0]["prompts"] == bq.dev_set(1, 2, 9)[0].prompts
    for name, run in runs.items():
        assert len(run["stories"]) == 1 and len(run["stories"][0]["clips"]) == 2
        assert len(run["aggregate"]["curves"]["pass_rate"]) == 2
        assert 0.0 <= run["aggregate"]["clip_pass_rate"] <= 1.0
    # modes run as users run them (the model's own SVI LoRA), but naive chaining is plain I2V
    assert runs["pro"]["svi_lora"] == runs["svi2"]["svi_lora"] == "svi.safetensors" and runs["chain"]["svi_lora"] is None
    # naive chaining is chain with colour matching off, generated on its own (not reused from chain)
    assert runs["naive"]["mode"] == "chain" and runs["naive"]["svi_lora"] is None
    assert runs["naive"]["story"] == {"color_match": "none"} and runs["chain"]["story"] == {}
    assert "same_as" not in runs["naive"]
    assert runs["pro-raw"]["mode"] == "pro" and runs["pro-raw"]["story"] == {"color_match": "none"}
    assert runs["pro-raw"]["svi_lora"] == "svi.safetensors" and "same_as" not in runs["pro-raw"]
    # ablation variants: the base model alone, the model's own LoRA (= the pro run), one LoRA file alone
    assert runs["own"]["same_as"] == "pro" and runs["own"]["stories"] == runs["pro"]["stories"]
    assert "same_as" not in runs["base"] and runs["base"]["svi_lora"] is None and runs["base"]["lora"] is None
    assert runs["ER"]["svi_lora"] is None and runs["ER"]["lora"] == str(lora)

    def bg(name):
        return [c["background_delta_e"] for c in runs[name]["stories"][0]["clips"]]

    assert bg("pro") != bg("base") and bg("ER") != bg("base") and bg("ER") != bg("pro")  # the LoRAs are applied
    assert results["runs"]["pro"]["aggregate"] == runs["pro"]["aggregate"]
    for img in ("quality_modes.png", "quality_ablation.png"):
        assert (tmp_path / "docs" / "img" / img).stat().st_size > 5000
    md = (tmp_path / "docs" / "benchmarks.md").read_text()
    section = md[md.index("<!-- quality:start -->"): md.index("<!-- quality:end -->")]
    assert "python benchmarks/bench_quality.py --model" in section and "Error-recycling ablation" in section
    assert "| `chain` | none |" in section and "| ER | `er.safetensors` |" in section
    assert "| `pro` | model's own (`svi.safetensors`) |" in section
    assert "`naive` = naive chaining" in section and "| `naive` | none |" in section
    assert len(list((tmp_path / "sheets").glob("*.png"))) == 7  # every run but "own" (it reuses pro)


def test_runs_after_a_fused_stack_get_their_own_engine(tmp_path):
    """The built-in model's pro runs clip 0 as image-to-video, its SVI LoRA unfused; svi2 fuses the
    same stack. pro-raw after svi2 (the default order) once met svi2's fused engine and stopped the
    whole benchmark; each mode now has its own engine."""
    out = bq.main(["--modes", "pro,svi2,pro-raw", "--stories", "1", "--clips", "2", "--steps", "2",
                   "--out-root", str(tmp_path)])
    assert list(out["runs"]) == ["pro", "svi2", "pro-raw"]
    assert all(len(r["stories"][0]["clips"]) == 2 for r in out["runs"].values())


def test_a_run_story_keys_reach_the_story(tmp_path):
    """``naive`` turns the model's colour matching off; ``chain`` keeps the model's default; the
    command line's overrides still win."""
    from types import SimpleNamespace

    import torch
    from PIL import Image

    ref = tmp_path / "ref.png"
    Image.new("RGB", (32, 32), (10, 20, 30)).save(ref)
    seen = []

    class Engine:  # records the story it is given and returns one blank clip
        def generate(self, story, progress=False):
            seen.append(story)
            return iter([SimpleNamespace(frames=torch.zeros(1, 32, 32, 3, dtype=torch.uint8), prompt="p")])

    dev = bq.dev_set(1, 2, 9)[0]
    for name in ("chain", "naive"):
        bq.generate_story(Engine(), dev, bq.mode_run(name), ref, {"steps": 2})
    chain, naive = seen
    assert chain.mode == naive.mode == "chain" and not chain.svi_lora and not naive.svi_lora
    assert chain.color_match is None and naive.color_match == "none" and naive.steps == 2
    assert chain.seed == naive.seed == dev.story_seed(0)
    bq.generate_story(Engine(), dev, bq.mode_run("naive"), ref, {"color_match": "previous"}, sample_seed=2)
    assert seen[-1].color_match == "previous" and seen[-1].seed == dev.seed + 2000


def test_bad_variant_is_one_clear_line(tmp_path):
    with pytest.raises(SystemExit, match="NAME=LORA.safetensors"):
        bq.parse_variant("er.safetensors")
    with pytest.raises(SystemExit, match="is not a .safetensors file"):
        bq.parse_variant(f"ER={tmp_path / 'missing.safetensors'}")
    assert bq.parse_variant("base=none").lora is None
    lora = tmp_path / "df.safetensors"
    lora.write_bytes(b"")
    run = bq.parse_variant(f"df={lora}@df:addnoise=20")
    assert (run.lora, run.route, run.route_options) == (lora, "df", {"addnoise": 20})
    assert bq.parse_variant("base=none").route == "svi"


def test_single_clip_prompts_cover_every_motion():
    prompts = check_base.single_prompts(12)
    assert prompts == check_base.single_prompts(12)
    motions = [parse_prompt(p).motion for p, _ in prompts]
    assert sorted(set(motions)) == sorted({"left", "right", "up", "down", "still", "bounce"})
    assert len({p for p, _ in prompts}) == 12


def test_single_clip_ground_truth_meets_the_bar():
    """What the check demands of a clip, the world's own clip from the same reference satisfies."""
    from cliploom.shapesworld import scene_from_prompt

    for prompt, seed in check_base.single_prompts(12):
        frames = scene_from_prompt(prompt, frames=33, seed=seed).frames()
        c = bq.score(frames, [prompt], [len(frames)])["clips"][0]
        assert c["area_status"] == "kept" and c["checks"]["motion"] is True, (prompt, c["failed"])


def test_check_base_smoke(tiny_dirs, tmp_path):
    r = check_base.main(["--model", str(tiny_dirs["wan21"]), "--clips", "2", "--vae-clips", "1", "--frames", "9",
                         "--steps", "2", "--out-root", str(tmp_path)])
    assert r["single"]["clips"] == 2 and len(r["single"]["records"]) == 2
    assert r["single"]["mode"] == "chain" and set(r["single_other_modes"]) == {"pro"}
    assert 0 <= r["single"]["rate"] <= 1 and r["vae"]["psnr_mean"] > 0 and 0 <= r["vae"]["evaluator_pass_rate"] <= 1
    saved = json.loads((tmp_path / "benchmarks" / "results" / "base_quality.json").read_text())
    assert saved["vae"]["frames"] == 9
    docs = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "<!-- quality-base:start -->" in docs and "single clips in pro mode" in docs


def test_psnr():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] = 255  # one of 96 values off by 255: MSE = 255^2 / 96
    assert check_base.psnr(a, b) == pytest.approx(10 * np.log10(96))
    assert check_base.psnr(a, a) == 99.0


class _IdentityVAE:
    """A stand-in model whose VAE round trip is exact, or darkens every frame."""

    def __init__(self, darken: float = 0.0):
        self.darken = darken

    def encode_video(self, video):
        return video

    def decode_latents(self, latents):
        import torch

        frames = ((latents[0].permute(1, 2, 3, 0) + 1) * 127.5 * (1 - self.darken)).round().clamp(0, 255)
        return frames.to(torch.uint8)


def test_vae_check_scores_round_trips():
    exact = check_base.vae_check(_IdentityVAE(), 3, 17, 32)
    assert exact["psnr_mean"] == 99.0 and exact["meets_bar"] and exact["evaluator_pass_rate"] == 1.0
    dark = check_base.vae_check(_IdentityVAE(darken=0.3), 3, 17, 32)
    assert dark["psnr_mean"] < 30 and not dark["meets_bar"]


def test_trace_boundaries_follows_the_subject_across_every_boundary(capsys):
    import trace_boundaries

    rows = trace_boundaries.main([str(trace_boundaries.ROOT / "examples" / "demo.yaml")])
    assert [r["clip"] for r in rows] == list(range(10))
    for before, after in zip(rows, rows[1:]):
        assert np.array_equal(after["previous_last"], before["last"])
    assert all(np.isfinite(r["frame0"]).all() and np.isfinite(r["first_kept"]).all() for r in rows)
    assert "clips re-create their tail nearer the anchor" in capsys.readouterr().out


def test_latent_context_measures_the_same_frames_deep_and_shallow():
    import latent_context

    r = latent_context.main(["--sequences", "2"])
    assert len(r["per_sequence"]) == 2 and all(v > 0 for v in r["per_sequence"])
    assert r["unrelated_clips"] > 0


def test_sample_seed_draws_other_noise_over_the_same_dev_set(tiny_dirs, tmp_path):
    """--sample-seed: the run-to-run spread of the dev-set numbers, without changing the stories."""
    out = {}
    for s in (0, 1):
        argv = ["--model", str(tiny_dirs["wan21"]), "--stories", "1", "--clips", "2", "--frames", "9", "--steps", "2",
                "--modes", "chain", "--sample-seed", str(s), "--out-root", str(tmp_path / str(s))]
        out[s] = bq.main(argv)
    assert out[1]["settings"]["sample_seed"] == 1 and out[0]["dev_set"] == out[1]["dev_set"]
    bg = [[c["background_delta_e"] for c in out[s]["runs"]["chain"]["stories"][0]["clips"]] for s in (0, 1)]
    assert bg[0] != bg[1]
    # several seeds in one run (make bench-quality: 0,1,2): each seed's stories as its own run drew them
    argv = ["--model", str(tiny_dirs["wan21"]), "--stories", "1", "--clips", "2", "--frames", "9", "--steps", "2",
            "--modes", "chain", "--sample-seed", "0,1", "--out-root", str(tmp_path / "both")]
    both = bq.main(argv)
    run = both["runs"]["chain"]
    assert both["settings"]["sample_seeds"] == [0, 1] and [s["sample_seed"] for s in run["seeds"]] == [0, 1]
    assert [s["sample_seed"] for s in run["stories"]] == [0, 1] and run["aggregate"]["stories"] == 2
    for k in (0, 1):  # the same path in one process: the same frames, so the same numbers
        assert [c["background_delta_e"] for c in run["stories"][k]["clips"]] == bg[k]
        assert run["seeds"][k]["aggregate"] == out[k]["runs"]["chain"]["aggregate"]
    md = (tmp_path / "both" / "docs" / "benchmarks.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| `chain`"))
    rates = [s["aggregate"]["clip_pass_rate"] for s in run["seeds"]]
    assert f"{100 * rates[0]:.1f} % / {100 * rates[1]:.1f} % → {100 * sum(rates) / 2:.1f} %" in row
    assert "Sampling seeds 0, 1" in md
    with pytest.raises(SystemExit):
        bq.parse_args(["--sample-seed", "0,0"])


def test_quality_sweep_runs_one_line_per_setting(capsys):
    import quality_sweep

    r = quality_sweep.main(['{"mode": "chain", "svi_lora": false, "steps": 2}', "--stories", "1"])
    out = capsys.readouterr().out
    assert "% of clips pass" in out and 0.0 <= r["aggregate"]["clip_pass_rate"] <= 1.0
    assert r["aggregate"]["stories"] == 1


def test_quality_sweep_runs_longer_stories_on_the_same_plan(capsys):
    import quality_sweep

    r = quality_sweep.main(['{"mode": "chain", "svi_lora": false, "steps": 2}', "--stories", "1", "--clips", "3"])
    assert "colour ΔE clip 3" in capsys.readouterr().out
    assert r["aggregate"]["clips"] == 3
    # the longer plan starts with the 20-clip plan's clips
    assert bq.dev_set(2, 24)[1].prompts[:20] == bq.dev_set(2, 20)[1].prompts


def test_route_runs_parse_and_map_to_story_keys(tmp_path):
    import bench_routes as br

    run = br.parse_run("causal jitter=causal:rope_jitter=0.4:recache=true")
    assert (run.name, run.route, run.options) == ("causal jitter", "causal", {"rope_jitter": 0.4, "recache": True})
    assert br.parse_run("df").name == "df" and br.parse_run("df").options == {}
    assert br.story_keys(br.parse_run("chain"), {}) == {"mode": "chain", "svi_lora": False}
    assert br.story_keys(run, {}) == {"mode": "pro", "route": "causal", "route_options": run.options}
    lora = tmp_path / "df.safetensors"
    keys = br.story_keys(br.parse_run("df:addnoise=20"), {"df": str(lora)})
    twin = tmp_path / "twin.safetensors"
    twin.write_bytes(b"")
    assert br.story_keys(br.parse_run(f"df twin=df:lora={twin}"), {"df": str(lora)})["loras"][0].path == twin.resolve()
    assert keys["loras"][0].path == lora and keys["svi_lora"] is False and keys["route_options"] == {"addnoise": 20}
    # sampling settings of a run: causal stage 1 sampled as the self-forcing student is
    keys = br.story_keys(br.parse_run("causal 4=causal:steps=4:guidance=1"), {})
    assert keys["steps"] == 4 and keys["guidance"] == keys["guidance_low"] == 1.0 and keys["route_options"] == {}
    assert br.story_keys(br.parse_run("sf=self-forcing:sampler=renoise"), {})["sampler"] == "renoise"
    assert br.story_keys(br.parse_run("h=helios:color_match=none"), {})["color_match"] == "none"
    assert "color_match" not in br.story_keys(br.parse_run("helios"), {})
    assert br.story_keys(br.parse_run("c=chain:color_match=none"), {})["color_match"] == "none"
    for bad, message in (("warp", "unknown route 'warp'"), ("df:window=2", "has no option 'window'"),
                         ("helios:color_match=lab", "color_match must be none, anchor or previous"),
                         ("causal:sampler=heun", "sampler must be one of"),
                         ("causal:window=99", "out of range"), ("causal:steps=0", "steps must be a positive number"),
                         ("df:lora=/nowhere.safetensors", "is not a file")):
        with pytest.raises(SystemExit, match=message):
            br.parse_run(bad)


def test_route_table_runs_and_merges_rows_into_it(tmp_path):
    """bench_routes end to end at toy size (1 story x 2 clips, built-in model): the table, then a
    row merged into it (the rows before kept, the merge command recorded in docs/routes.md)."""
    import bench_routes as br

    common = ["--stories", "1", "--clips", "2", "--seeds", "0", "--no-resources", "--out-root", str(tmp_path)]
    first = br.main(["--runs", "svi", *common])
    assert set(first["runs"]) == {"svi"} and 0 <= first["runs"]["svi"]["mean"]["clip_pass_rate"] <= 1
    merged = br.main(["--runs", "causal 4=causal:steps=4:guidance=1", "--merge", *common])
    assert set(merged["runs"]) == {"svi", "causal 4"} and merged["runs"]["svi"] == first["runs"]["svi"]
    assert merged["runs"]["causal 4"]["sampling"] == {"steps": 4, "guidance": 1}
    doc = (tmp_path / "docs" / "routes.md").read_text()
    assert "| causal 4 |" in doc and "Rows added by `python benchmarks/bench_routes.py --runs causal 4" in doc
    again = br.main(["--runs", "causal 4=causal:steps=4:guidance=1", "--merge", *common])  # re-measured: logged once
    assert again["merged_commands"] == merged["merged_commands"] and len(again["merged_commands"]) == 1
    with pytest.raises(SystemExit, match="made with 1 stories x 2 clips"):
        br.main(["--runs", "svi", "--merge", "--stories", "1", "--clips", "3", "--seeds", "0", "--no-resources",
                 "--out-root", str(tmp_path)])
    # --drop removes rows (e.g. measured on the wrong weights) and runs nothing; an unknown name is refused
    dropped = br.main(["--drop", "causal 4", "--out-root", str(tmp_path)])
    assert set(dropped["runs"]) == {"svi"} and dropped["runs"]["svi"] == first["runs"]["svi"]
    doc = (tmp_path / "docs" / "routes.md").read_text()
    assert "| causal 4 |" not in doc and "Rows removed by `python benchmarks/bench_routes.py --drop causal 4" in doc
    with pytest.raises(SystemExit, match="no run named 'causal 4'"):
        br.main(["--drop", "causal 4", "--out-root", str(tmp_path)])


def test_route_timing_runs_every_route_against_svi_cold_and_warm(tmp_path):
    """time_routes at toy size (2 clips, one round): each run timed cold (a fresh engine) and warm
    (the same engine again), every ratio against svi's own times."""
    import time_routes

    out = time_routes.main(["--runs", "svi,causal", "--rounds", "1", "--clips", "2", "--json", str(tmp_path / "t.json")])
    assert set(out["runs"]) == {"svi", "causal"}
    for case in ("cold", "warm"):
        svi, causal = out["runs"]["svi"][case], out["runs"]["causal"][case]
        assert causal["first_frames_s"] > 0 and causal["s_per_clip"] > 0
        # the ratios are of the two runs' own medians (rounded as written)
        assert causal["clip_ratio_to_svi"] == pytest.approx(causal["s_per_clip"] / svi["s_per_clip"], rel=0.01)
        assert causal["first_ratio_to_svi_first_clip"] == pytest.approx(
            causal["first_frames_s"] / svi["first_frames_s"], rel=0.01)
    assert json.loads((tmp_path / "t.json").read_text()) == out
    with pytest.raises(SystemExit, match="must start with svi"):
        time_routes.main(["--runs", "causal,svi"])


def test_memory_curve_counts_the_tensors_a_route_keeps():
    import memory_curve

    out = memory_curve.main(["--runs", "causal", "--clips", "5", "--every", "1"])
    rows = out["causal"]
    assert [r["clips"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["tensors"] > 100 and r["tensor_mib"] > 1 for r in rows)
    # sink 1 + window 2: the cache is full from clip 3 on, so later clips keep no more tensors
    assert rows[4]["tensor_mib"] <= rows[3]["tensor_mib"] * 1.01 and rows[4]["tensors"] <= rows[3]["tensors"]


def test_story_sheet_draws_one_row_per_clip(tmp_path):
    import story_sheet
    from PIL import Image

    out = story_sheet.main(["11", str(tmp_path / "s.png"), '{"steps": 2}', "--clips", "2", "--scale", "1"])
    sheet = np.asarray(Image.open(out))
    # clip 0: 17 frames -> 9 shown, clip 1: 12 -> 6; 32 px each, rows 32 px + a 2 px line
    assert sheet.shape == (2 * 34, 9 * 32, 3)
    assert sheet[32:34].max() == 0 and sheet[:32].std() > 0  # the line between clips; frames that are not blank


def test_story_track_follows_the_subject_against_the_world(capsys):
    import story_track

    records = story_track.main(["13", '{"steps": 2}', "--clips", "3"])
    assert [r["index"] for r in records] == [0, 1, 2] and records[0]["motion"] == "right"
    # clip 0 is the base model's image-to-video from the world's own first frame: its subject ends within a
    # few px of where the world's does (a 2-step sampler is rough; 4 px is an eighth of the frame)
    assert np.linalg.norm(np.subtract(records[0]["measured_end"], records[0]["world_end"])) < 4.0
    assert all(len(r["block_rgb"]) == 3 for r in records)  # story 13 has a gray block
    assert "clip  2" in capsys.readouterr().out


def test_colour_variants_match_the_opening_frames_to_the_reference(capsys):
    """Dev story 6 (a small purple circle on striped teal): the first clip's frames 0-1 carry the VAE
    round trip's cast, which whole-clip RGB matching leaves (ΔE 2.56 from clip 1 on, measured against
    frame 0); matching them alone to the reference takes it away. The variant is restored after."""
    import colour_variants
    from cliploom import loom

    engine_decoder = loom.ClipDecoder
    shipped = colour_variants.main(["default", "--stories", "6", "--clips", "2"])
    assert loom.ClipDecoder is engine_decoder
    opening = colour_variants.main(["opening", "--stories", "6", "--clips", "2"])
    assert loom.ClipDecoder is engine_decoder
    assert shipped[6] > 1.5 and opening[6] < 0.5, (shipped, opening)
    assert "story  6 opening" in capsys.readouterr().out


def test_lora_by_step_sets_the_svi_lora_weight_on_each_step(monkeypatch, capsys):
    """The harness of the low-noise LoRA row: full weight above ``below``, ``low`` x the clip's weight
    under it, and the i2v clip 0 without the LoRA on every step."""
    import lora_by_step
    import quality_sweep
    from cliploom.models.lora import LoraStack

    seen = []
    original = LoraStack.set_clip_weights

    def record(self, weights):
        seen.append(None if weights is None else weights.get("svi"))
        original(self, weights)

    monkeypatch.setattr(LoraStack, "set_clip_weights", record)
    lora_by_step.patch(0.25, 0.9, setattr=monkeypatch.setattr)  # 2 steps: sigma 1, then 0.83
    quality_sweep.main(['{"steps": 2}', "--stories", "1"])
    # per clip: the engine's own call (clip 0: svi 0; later: None, the stack's weights), then one per step
    per_clip = [seen[k : k + 3] for k in range(0, len(seen), 3)]
    assert len(per_clip) == 20 and per_clip[0] == [0.0, 0.0, 0.0]
    assert all(c == [None, 1.0, 0.25] for c in per_clip[1:])
    assert "stories clean" in capsys.readouterr().out


def test_lora_soup_applies_the_mean_of_the_deltas(tmp_path):
    import lora_soup
    import torch
    from cliploom.models.formats import read_lora
    from cliploom.train.export import export_lora

    g = torch.Generator().manual_seed(0)
    names = ["blocks.0.attn1.to_q", "blocks.0.ffn.net.0.proj"]
    files, deltas = [], []
    for i, (rank, alpha) in enumerate([(2, 4.0), (3, 3.0)]):  # other ranks and scales: each file's own scale counts
        state = {}
        for n in names:
            state[f"{n}.lora_A.weight"] = torch.randn(rank, 6, generator=g)
            state[f"{n}.lora_B.weight"] = torch.randn(5, rank, generator=g)
        files.append(export_lora(state, tmp_path / f"l{i}.safetensors", "svi" if i else "diffusers", rank=rank, alpha=alpha))
        deltas.append({n: alpha / rank * state[f"{n}.lora_B.weight"] @ state[f"{n}.lora_A.weight"] for n in names})
    out = tmp_path / "soup" / "s.safetensors"
    lora_soup.main([str(out), *map(str, files)])
    got = read_lora(out)
    assert got.ranks == [5] and set(got.pairs()) == set(names)
    sd = got.peft_state_dict()
    for n in names:  # float32 sums of a few products: close to ~1e-6
        torch.testing.assert_close(sd[f"{n}.lora_B.weight"] @ sd[f"{n}.lora_A.weight"], (deltas[0][n] + deltas[1][n]) / 2)
    assert [p.name for p in out.parent.iterdir()] == ["s.safetensors"]  # nothing half-written left
    other = export_lora({k: v for k, v in read_lora(files[0]).peft_state_dict().items() if names[0] in k},
                        tmp_path / "one.safetensors", "svi", rank=2, alpha=2.0)
    with pytest.raises(SystemExit, match="adapts other modules"):
        lora_soup.main([str(tmp_path / "x.safetensors"), str(files[0]), str(other)])


def test_memory_cost_times_both_memory_settings_on_the_same_stories(monkeypatch, capsys, tiny_dirs):
    """``benchmarks/memory_cost.py`` runs each story once per ``memory_from`` setting and per round,
    in turn, and prints both seconds per clip and their ratio."""
    import memory_cost

    from cliploom.engine import Engine

    seen = []
    original = Engine.generate

    def spy(self, story, **kw):
        seen.append((story.reference.name, story.memory_from, len(story.clips)))
        return original(self, story, **kw)

    monkeypatch.setattr(Engine, "generate", spy)
    med = memory_cost.main(["--stories", "1", "--clips", "2", "--repeats", "2", "--model", str(tiny_dirs["wan21"])])
    assert seen[1:] == [("ref_00.png", key, 2) for _ in range(2) for key in ("latents", "frames")]
    assert med["latents"] > 0 and med["frames"] > 0
    assert "ratio" in capsys.readouterr().out
