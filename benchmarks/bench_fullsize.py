"""Real-size benchmark: the shipped family configs (Wan 2.1 I2V 14B 480P, Wan 2.2 A14B, TI2V 5B)
built with random weights, so every matmul has the real model's shape and FLOPs, with nothing
downloaded.

    python benchmarks/bench_fullsize.py --cpu-smoke [--families wan21-i2v-14b-480p,wan22-i2v-a14b]
    python benchmarks/bench_fullsize.py --gpu [--families wan21-i2v-14b-480p] [--sets bf16,fp8,...]
    python benchmarks/bench_fullsize.py --cpu-smoke --tiny     # the same code at toy size (seconds)
    python benchmarks/bench_fullsize.py --gpu --tiny --device cpu

``--cpu-smoke`` writes each model as users download it (the DiT as one ComfyUI ``fp8_scaled``
single file, ~14 GB per 14B expert, to a temp dir deleted after), loads it through the normal CLI
(``cliploom generate --model DIR --family F --weights fp8``) in a child process, runs one clip of
9 frames at 64x64 with one denoise step per expert, and reports the child's peak memory (resident
set, split into anonymous memory and file-backed pages: fp8 weights are memory-mapped from the
file, so the kernel can drop an idle expert's pages and read them back) and its wall time.

``--gpu`` times one 81-frame 480x832 clip, 4 steps, guidance 1, K = 1 for each option set (bf16;
fp8 storage; fp8 matmul; each installed attention backend; compile; decode overlap off): seconds
per clip (a story of three clips; the warm clip between the first two hand-overs, since with decode
overlap clip k > 0 is handed over once clip k+1 is denoised), the first clip after load, peak VRAM,
GPU seconds per second of video and model FLOP utilisation against the device's dense peak.

The encoders are cut to one layer at their real width (a text encoder runs once per prompt, not
per step; both have their real output shapes, so the DiT sees real sequence lengths).

Results go to benchmarks/results/fullsize_{cpu,gpu}.json; docs/performance.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PROMPT = "a big red circle moves right on a navy background"
GIB = 1024 ** 3

# Dense tensor-core peaks (TFLOP/s, no sparsity) of the GPUs users run Wan on, by name fragment.
PEAKS = {"H200": (989.0, 1979.0), "H100": (989.0, 1979.0), "H20": (148.0, 296.0), "A100": (312.0, None),
         "L40S": (362.0, 733.0), "L4": (121.0, 242.0), "4090": (165.0, 330.0), "5090": (209.0, 419.0)}


# -- the model, as files -----------------------------------------------------------------------------


def family_config(name: str, tiny: bool) -> dict:
    """A shipped family config; ``tiny`` keeps its structure (layer kinds, channels, text and image
    widths) and shrinks depth and width, to rehearse the benchmark in seconds."""
    from cliploom.models.loading import load_family

    family = load_family(name)
    if tiny:
        t = family["transformer"]
        t.update(num_layers=1, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, freq_dim=32)
        if t.get("added_kv_proj_dim"):
            t["added_kv_proj_dim"] = 32
        v = family["vae"]
        v["base_dim"] = 8
        if "decoder_base_dim" in v:
            v["decoder_base_dim"] = 8
    return family


def dit_entries(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """``(original Wan name, shape)`` of every DiT weight, from the diffusers model built on the meta device."""
    from diffusers import WanTransformer3DModel

    from cliploom.models import formats

    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = WanTransformer3DModel(**cfg)
    _, to_original = formats.name_tables(cfg["num_layers"])
    return [(to_original[k], tuple(v.shape)) for k, v in model.state_dict().items()]


class RandomBytes:
    """A 64 MiB pool of random fp8 e4m3 bytes with the top exponent bit clear (|x| <= 1.875, never
    NaN), handed out cyclically so writing 14 GB costs disk time, not random-number time."""

    def __init__(self, seed: int = 0, size: int = 64 << 20):
        rng = np.random.default_rng(seed)
        self.pool = rng.integers(0, 256, size, dtype=np.uint8) & np.uint8(0xBF)
        self.at = 0

    def take(self, n: int):
        out = []
        while n:
            k = min(n, len(self.pool) - self.at)
            out.append(memoryview(self.pool[self.at:self.at + k]))
            n -= k
            self.at = (self.at + k) % len(self.pool)
        self.at = (self.at + 4099) % len(self.pool)  # tensors do not start on the same bytes
        return out


def write_fp8_scaled_dit(path: Path, config: dict, seed: int = 0) -> int:
    """Write a ComfyUI ``fp8_scaled`` single-file DiT (``model.diffusion_model.`` keys, 2-D weights in
    e4m3 with a float32 ``scale_weight`` each, the ``scaled_fp8`` marker, the rest bf16) by streaming
    each tensor to disk: the file is never in memory. Returns its size in bytes."""
    gen = torch.Generator().manual_seed(seed)
    pool = RandomBytes(seed)
    items = []  # (key, dtype, shape, producer)
    for name, shape in dit_entries(config):
        key = f"model.diffusion_model.{name}"
        n = math.prod(shape)
        if name.endswith(".weight") and len(shape) == 2:
            items.append((key, "F8_E4M3", shape, lambda n=n: pool.take(n)))
            scale = torch.tensor([1.0 / math.sqrt(shape[1])], dtype=torch.float32)
            items.append((key[: -len("weight")] + "scale_weight", "F32", (1,), lambda s=scale: [s.numpy().tobytes()]))
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            make = lambda shape=shape: torch.zeros(shape)  # noqa: E731
        elif len(shape) == 1:  # norm gains
            make = lambda shape=shape: torch.ones(shape)  # noqa: E731
        else:  # modulation tables, the patch embedding
            fan = math.prod(shape[1:]) if len(shape) > 2 else 50.0
            make = lambda shape=shape, fan=fan: torch.randn(shape, generator=gen) / math.sqrt(fan)  # noqa: E731
        items.append((key, "BF16", shape, lambda make=make: [make().to(torch.bfloat16).view(torch.uint8).numpy().tobytes()]))
    items.append(("scaled_fp8", "F8_E4M3", (0,), lambda: []))
    width = {"F8_E4M3": 1, "BF16": 2, "F32": 4}
    header, offset = {}, 0
    for key, dtype, shape, _ in items:
        size = math.prod(shape) * width[dtype]
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt", "written_by": "cliploom benchmarks/bench_fullsize.py (random weights)"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, _, _, produce in items:
            for chunk in produce():
                f.write(chunk)
        # On disk and out of the page cache, as a downloaded file is: a load straight after writing
        # would otherwise map pages still under writeback (which the kernel copies into anonymous memory).
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return path.stat().st_size


def write_model(folder: Path, family: dict, seed: int = 0) -> dict:
    """An original-format model folder as users download it: the DiT file(s) (fp8_scaled), the VAE
    (diffusers ``vae/``), one-layer encoders at their real widths, and the family JSON beside it."""
    from diffusers import AutoencoderKLWan
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    from cliploom.models.tiny import build_byte_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    t0 = time.perf_counter()
    if family["experts"] == 2:
        for i, expert in enumerate(("high", "low")):
            f = folder / f"wan2.2_i2v_{expert}_noise_14B_fp8_scaled.safetensors"
            sizes[f.name] = write_fp8_scaled_dit(f, family["transformer"], seed + i)
    else:
        f = folder / f"{family['name']}_fp8_scaled.safetensors"
        sizes[f.name] = write_fp8_scaled_dit(f, family["transformer"], seed)
    seconds_dit = time.perf_counter() - t0
    torch.manual_seed(seed)
    vae_cfg = {k: v for k, v in family["vae"].items() if not k.startswith("_")}
    AutoencoderKLWan(**vae_cfg).save_pretrained(folder / "vae", safe_serialization=True)
    tokenizer = build_byte_tokenizer(family["settings"].get("max_sequence_length", 512))
    tokenizer.save_pretrained(folder / "tokenizer")
    text = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=family["transformer"]["text_dim"], d_kv=64, d_ff=256, num_layers=1,
        num_heads=8, relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1))
    text.save_pretrained(folder / "text_encoder", safe_serialization=True)
    if family.get("image_encoder"):
        dim = family["transformer"]["image_dim"]
        CLIPVisionModel(CLIPVisionConfig(hidden_size=dim, intermediate_size=256, projection_dim=dim, num_hidden_layers=1,
                                         num_attention_heads=16, image_size=224, patch_size=14)
                        ).save_pretrained(folder / "image_encoder", safe_serialization=True)
        CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
            folder / "image_processor")
    family_file = folder.parent / f"{folder.name}.family.json"
    family_file.write_text(json.dumps({k: v for k, v in family.items() if k != "path"}, indent=1))
    return {"family_file": str(family_file), "dit_bytes": sum(sizes.values()), "seconds_write_dit": round(seconds_dit, 1)}


def reference_image(path: Path, size: int = 64) -> Path:
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // size, y * 255 // size, np.full_like(x, 90)], -1).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return path


# -- the CPU smoke: the normal CLI in a child process, its memory watched ----------------------------


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def run_watched(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; sample its resident memory every 50 ms; its peak RSS from the kernel at exit."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    out_lines: list[str] = []
    reader = threading.Thread(target=lambda: out_lines.extend(proc.stdout), daemon=True)
    reader.start()
    while True:
        now = _status(proc.pid)  # VmHWM: the kernel's peak of this exec'd image (ru_maxrss would count the fork)
        pid, status = os.waitpid(proc.pid, os.WNOHANG)
        if pid:
            break
        for k in peak:
            peak[k] = max(peak[k], now.get(k, 0))
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(5)
    return {"returncode": proc.returncode, "seconds_wall": round(wall, 1), "peak_rss": peak["VmHWM"],
            "peak_anon": peak["RssAnon"], "peak_file": peak["RssFile"], "output": "".join(out_lines)[-3000:]}


def cpu_smoke(name: str, tmp_root: Path, tiny: bool, keep: bool) -> dict:
    family = family_config(name, tiny)
    tmp = Path(tempfile.mkdtemp(prefix="cliploom-fullsize-", dir=tmp_root))
    try:
        model = tmp / name
        wrote = write_model(model, family)
        ref = reference_image(tmp / "ref.png")
        steps = family["experts"]  # one step per expert: both experts run and load
        out = tmp / "out.mp4"
        cmd = [sys.executable, "-m", "cliploom", "generate", "--model", str(model), "--family", wrote["family_file"],
               "--weights", "fp8", "--image", str(ref), "--prompt", PROMPT, "--clips", "1", "--frames", "9",
               "--width", "64", "--height", "64", "--steps", str(steps), "--guidance", "1", "--seed", "0",
               "--device", "cpu", "--out", str(out), "--quiet"]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        res = run_watched(cmd, env)
        report = json.loads(out.with_suffix(".json").read_text()) if res["returncode"] == 0 else None
        params = sum(math.prod(s) for _, s in dit_entries(family["transformer"])) * family["experts"]
        row = {"family": name, "tiny": tiny, "dit_params": params, **wrote, **res, "steps": steps,
               "seconds_generate": report["totals"]["seconds"] if report else None}
        if report:
            row["seconds_load"] = round(res["seconds_wall"] - report["totals"]["seconds"], 1)
            row["weights"] = report.get("weights")
        return row
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / f"{name}.family.json").unlink(missing_ok=True)


# -- the GPU benchmark: one process, option sets in turn ---------------------------------------------


def dit_flops(config: dict, frames: int, height: int, width: int, text_tokens: int = 512, image_tokens: int = 257,
              spatial: int = 16) -> float:
    """Multiply-adds x 2 of one DiT forward: every linear layer on every token, self-attention over
    all tokens, cross-attention to the text (and image) tokens. Norms, RoPE and softmax are left out."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    tokens = ((frames - 1) // 4 + 1) * (height // spatial) * (width // spatial)  # spatial: VAE stride x patch
    per_block = 4 * d * d + 2 * d * d + 2 * d * config["ffn_dim"]  # self qkvo, cross q+o, ffn
    context = text_tokens + (image_tokens if config.get("image_dim") else 0)
    linear = 2 * tokens * per_block + 2 * context * 2 * d * d * (2 if config.get("image_dim") else 1)
    attention = 4 * tokens * tokens * d + 4 * tokens * context * d
    return float(config["num_layers"] * (linear + attention))


def option_sets(device: torch.device) -> list[dict]:
    """One change at a time from the bf16 + sdpa base, the sets that keep the engine as it is first
    (compile and fp8 matmuls change it for good), then everything fast together."""
    from cliploom.models.acceleration import installed_attention, resolve_attention

    sets = [{"name": "bf16", "weights": "bf16", "attention": "sdpa"}]
    sets += [{"name": f"attention {b}", "weights": "bf16", "attention": b}
             for b in installed_attention(device) if b not in ("sdpa", "math")
             and not (b == "flex" and device.type == "cuda")]  # eager flex: a 32 760^2 score matrix per head
    sets.append({"name": "no decode overlap", "weights": "bf16", "attention": "sdpa", "overlap_decode": False})
    sets.append({"name": "compile", "weights": "bf16", "attention": "sdpa", "compile": True})
    sets.append({"name": "fp8 storage", "weights": "fp8", "attention": "sdpa"})
    fp8_cores = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
    if fp8_cores:
        sets.append({"name": "fp8 matmul", "weights": "bf16", "attention": "sdpa", "fp8_matmul": True})
    sets.append({"name": f"fastest ({'fp8 matmul, ' if fp8_cores else ''}{resolve_attention('auto', device)}, compile)",
                 "weights": "bf16", "attention": "auto", "compile": True, "fp8_matmul": fp8_cores})
    return sets


def gpu_bench(name: str, tmp_root: Path, tiny: bool, device: str, only: list[str] | None,
              on_row=lambda row: None) -> list[dict]:
    """Each option set in turn; a set that fails (a backend or torchao that does not run on this
    device) becomes a row with its error, and the next set starts from a fresh engine. ``on_row``
    sees each row as it is made (the results file is rewritten, so a run cut short keeps its rows)."""
    dev = torch.device(device)
    family = family_config(name, tiny)
    frames, height, width = (9, 64, 64) if tiny else (81, 480, 832)
    fps = family["settings"].get("fps", 16)
    spatial = family["vae"].get("scale_factor_spatial", 8) * family["transformer"]["patch_size"][1]
    flops = dit_flops(family["transformer"], frames, height, width, spatial=spatial) * 4
    peak_bf16, peak_fp8 = next((v for k, v in PEAKS.items() if dev.type == "cuda" and k in torch.cuda.get_device_name(dev)),
                               (None, None))
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="cliploom-fullsize-", dir=tmp_root))
    try:
        wrote = write_model(tmp / name, family)
        ref = reference_image(tmp / "ref.png", size=256)
        state = {"engine": None, "reusable": None, "seconds_load": 0.0}
        for options in option_sets(dev):
            if only and not any(options["name"].startswith(o) for o in only):
                continue
            try:
                row = _one_set(state, options, name, tmp / name, wrote["family_file"], ref, dev,
                               (frames, height, width, fps), flops, (peak_bf16, peak_fp8))
            except Exception as exc:  # noqa: BLE001 - recorded in the row; the next set starts clean
                row = {"family": name, "set": options["name"], "returncode": 1,
                       "error": f"{type(exc).__name__}: {exc}"[:800]}
                state.update(engine=None, reusable=None)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            on_row(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _one_set(state: dict, options: dict, name: str, model_dir: Path, family_file: str, ref: Path,
             dev: torch.device, shape: tuple, flops: float, peaks: tuple) -> dict:
    """Time three clips of one option set. ``state`` carries the engine between sets: it is reused
    when the storage is the same and the last set neither compiled nor quantised it."""
    from cliploom import Engine
    from cliploom.story import make_story

    frames, height, width, fps = shape
    fresh = state["reusable"] != options["weights"]
    if fresh:  # a fresh engine: other storage, or compiled / quantised before
        state.update(engine=None, reusable=None)  # the old one is freed before the new one loads
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        state["engine"] = Engine.load(model_dir, family=family_file, device=str(dev), weights=options["weights"],
                                      dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
        state["seconds_load"] = time.perf_counter() - t0
    engine = state["engine"]
    state["reusable"] = None if options.get("compile") or options.get("fp8_matmul") else options["weights"]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    story = make_story(  # three clips: with decode overlap the engine hands clip k over once clip k+1 is denoised
        reference=str(ref), prompts=[PROMPT] * 3, frames=frames, width=width, height=height, steps=4,
        guidance=1.0, motion_latents=1, seed=0, attention=options.get("attention", "auto"),
        compile=options.get("compile", False), fp8_matmul=options.get("fp8_matmul", False))
    clips, t_prev = [], time.perf_counter()
    for clip in engine.generate(story, progress=False, overlap_decode=options.get("overlap_decode")):
        now = time.perf_counter()
        clips.append({"seconds": now - t_prev, "denoise": clip.seconds_denoise, "decode": clip.seconds_decode,
                      "compile": clip.seconds_compile})
        t_prev = now
    warm = clips[1]["seconds"]  # between the first and second hand-over: one clip of a long video, warm
    peak = peaks[1] if options.get("fp8_matmul") else peaks[0]
    return {"family": name, "set": options["name"], "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "seconds_load": round(state["seconds_load"], 1) if fresh else None, "seconds_first_clip": round(clips[0]["seconds"], 2),
            "seconds_compile": round(clips[0]["compile"], 2), "seconds_per_clip": round(warm, 2),
            "seconds_denoise": round(clips[1]["denoise"], 2), "seconds_decode": round(clips[1]["decode"], 2),
            "seconds_three_clips": round(sum(c["seconds"] for c in clips), 2), "overlap_decode": engine_overlaps(dev, options),
            "gpu_seconds_per_video_second": round(warm / (frames / fps), 3),
            "peak_vram_gib": round(torch.cuda.max_memory_allocated(dev) / GIB, 2) if dev.type == "cuda" else None,
            "dit_flop_per_clip": flops, "dit_pflop_per_clip": round(flops / 1e15, 3),
            "mfu": round(flops / clips[1]["denoise"] / (peak * 1e12), 3) if peak else None}


def engine_overlaps(dev: torch.device, options: dict) -> bool:
    """Whether the engine decodes one clip while it denoises the next (its default: on CUDA)."""
    chosen = options.get("overlap_decode")
    return dev.type == "cuda" if chosen is None else chosen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--cpu-smoke", action="store_true", help="write full-size fp8 files, load them with the CLI, one step")
    mode.add_argument("--gpu", action="store_true", help="time 81-frame 480p clips for each option set")
    ap.add_argument("--families", default=None, help="comma-separated family names (default: per mode)")
    ap.add_argument("--sets", default=None, help="--gpu: only the option sets whose names start so (comma-separated)")
    ap.add_argument("--tiny", action="store_true", help="the same code at toy size (a rehearsal)")
    ap.add_argument("--device", default="cuda", help="--gpu: the device (cpu to rehearse with --tiny)")
    ap.add_argument("--tmp", default=None, help="where the temporary model files go (default: the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the written model files")
    ap.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/fullsize_{cpu,gpu}.json)")
    args = ap.parse_args(argv)
    tmp_root = Path(args.tmp or tempfile.gettempdir())
    out = Path(args.out or RESULTS / f"fullsize_{'cpu' if args.cpu_smoke else 'gpu'}.json")
    import diffusers

    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    rows: list[dict] = []

    def save(row=None) -> None:
        if row is not None:
            rows.append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".part")
        tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        tmp.replace(out)

    if args.cpu_smoke:
        for name in (args.families or "wan21-i2v-14b-480p,wan22-i2v-a14b").split(","):
            row = cpu_smoke(name, tmp_root, args.tiny, args.keep)
            save(row)
            print(json.dumps({k: v for k, v in row.items() if k != "output"}), flush=True)
            if row["returncode"] != 0:
                print(row["output"], file=sys.stderr)
    else:
        for name in (args.families or "wan21-i2v-14b-480p").split(","):
            gpu_bench(name, tmp_root, args.tiny, args.device, args.sets.split(",") if args.sets else None, on_row=save)
    save()
    return 0 if all(r.get("returncode", 0) == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
