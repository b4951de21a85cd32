"""A hostile user's probe (``make bench-hostile``): malformed input through every command, each run
as a real process, checked against the contract.

The contract: bad input is one line on stderr (``error: ...``) and exit code 2; Ctrl-C is exit
130; never a traceback, a hang, an unbounded allocation or a file that looks finished. A case
passes when the process meets it: exit code as expected, stderr one ``error:`` line (no
``Traceback``), within its time limit, and the output it named absent (only ``*.partial`` or
``*.run/`` checkpoints may remain). Each process runs with ``CLIPLOOM_THREADS=1`` under an address
space limit (``--memory-gb``, default 8) so that a runaway allocation fails instead of the machine.

    python benchmarks/hostile.py                       # all cases, results + docs/reliability.md
    python benchmarks/hostile.py --only numbers --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a big red circle moves right on a navy background"
GOOD = {"reference": "ref.png", "frames": 17, "steps": 2, "seed": 1, "clips": [PROMPT, PROMPT]}


@dataclass
class Case:
    id: str
    category: str
    argv: list[str]
    setup: Callable[[Path, Path], None] | None = None  # (case dir, shared dir)
    expect: str = "error"  # error (exit 2, one line) | ok (exit 0) | interrupt (exit 130)
    outputs: tuple[str, ...] = ()  # must not exist afterwards (unless expect == ok)
    interrupt: str | None = None  # "early" | "mid" | "twice": SIGINT while it runs
    timeout: float = 90.0
    note: str = ""
    result: dict = field(default_factory=dict)


# -- helpers that write hostile files ---------------------------------------------------------------


def yaml_story(values: dict, name: str = "s.yaml"):
    def setup(d: Path, shared: Path) -> None:
        shutil.copy(shared / "ref.png", d / "ref.png")
        import yaml

        (d / name).write_text(yaml.safe_dump(values, sort_keys=False))
    return setup


def raw_story(text: str | bytes, name: str = "s.yaml"):
    def setup(d: Path, shared: Path) -> None:
        shutil.copy(shared / "ref.png", d / "ref.png")
        (d / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def story_with(key: str, raw_value: str):
    """The good story with one key replaced by raw YAML (so NaN / inf / huge ints stay as written)."""
    lines = ["reference: ref.png", "frames: 17", "steps: 2", "seed: 1", f"clips: ['{PROMPT}', '{PROMPT}']"]
    lines = [ln for ln in lines if not ln.startswith(key + ":")]
    return raw_story("\n".join(lines + [f"{key}: {raw_value}"]) + "\n")


def safetensors_bytes(header, data: bytes = b"") -> bytes:
    text = header if isinstance(header, (str, bytes)) else json.dumps(header)
    blob = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(blob)) + blob + data


def f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def lora_file(name: str, header, data: bytes = b""):
    def setup(d: Path, shared: Path) -> None:
        shutil.copy(shared / "ref.png", d / "ref.png")
        (d / name).write_bytes(safetensors_bytes(header, data))
        import yaml

        (d / "s.yaml").write_text(yaml.safe_dump({**GOOD, "loras": [{"path": name, "weight": 1.0}]}))
    return setup


def lora_tensors(tensors: dict, name: str = "l.safetensors", weight: float = 1.0):
    def setup(d: Path, shared: Path) -> None:
        import torch  # noqa: F401
        from safetensors.torch import save_file

        shutil.copy(shared / "ref.png", d / "ref.png")
        save_file(tensors, str(d / name))
        import yaml

        (d / "s.yaml").write_text(yaml.safe_dump({**GOOD, "loras": [{"path": name, "weight": weight}]}))
    return setup


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` with almost no data (a decompression bomb's shape)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def files(**contents):
    """Write files (bytes or text) into the case dir; ``ref.png`` is always there."""
    def setup(d: Path, shared: Path) -> None:
        shutil.copy(shared / "ref.png", d / "ref.png")
        for name, value in contents.items():
            path = d / name.replace("__", "/")
            path.parent.mkdir(parents=True, exist_ok=True)
            if value is None:
                path.mkdir(exist_ok=True)
            elif value == "FIFO":
                os.mkfifo(path)
            else:
                path.write_bytes(value if isinstance(value, bytes) else value.encode())
    return setup


def tiny_model(edit: Callable[[Path], None], family: bool = False):
    """A copy of the shared tiny wan21 model (diffusers layout), then ``edit`` on it."""
    def setup(d: Path, shared: Path) -> None:
        shutil.copy(shared / "ref.png", d / "ref.png")
        shutil.copytree(shared / "tiny", d / "m")
        edit(d / "m")
    return setup


def edit_json(rel: str, value):
    def edit(folder: Path) -> None:
        path = folder / rel
        if callable(value):
            data = json.loads(path.read_text())
            value(data)
            path.write_text(json.dumps(data))
        else:
            path.write_bytes(value if isinstance(value, bytes) else value.encode())
    return edit


def gen(*extra: str, story: str = "s.yaml", out: str = "o.mp4") -> list[str]:
    return ["generate", story, "--out", out, "-q", *extra]


def flags(*extra: str, out: str = "o.mp4") -> list[str]:
    return ["generate", "--image", "ref.png", "--prompt", PROMPT, "--frames", "17", "--steps", "2", "--out", out,
            "-q", *extra]


# -- the cases --------------------------------------------------------------------------------------


def cases() -> list[Case]:
    out: list[Case] = []
    add = out.append

    # Numbers in a story: not finite, not bounded, not the right type.
    numbers = {
        "frames": [".nan", ".inf", "-5", "0", "1000000001", str(2**70), "'17'", "3.5", "true", "[17]", "1e999"],
        "steps": [".nan", ".inf", "0", "-1", str(10**12), str(2**70), "'8'", "2.5", "1e999"],
        "guidance": [".nan", ".inf", "-.inf", "0", "-3", "1e308", "'5'", "[]"],
        "guidance_low": [".nan", ".inf", "0.5"],
        "shift": [".nan", ".inf", "0", "-1", "1e308"],
        "boundary": [".nan", "0", "1", "1.5", "-0.5"],
        "fps": [".nan", "0", "-16", str(2**70), "1000000"],
        "seed": [".nan", ".inf", "-1", str(2**70), "1e30", "'7'", str(2**64)],
        "width": [".nan", "0", "-32", "100000", str(2**70), "33"],
        "height": [".inf", "0", "100000", "31"],
        "motion_latents": ["0", "-1", "1000000000", ".nan"],
        "ref_pad": ["-5", str(2**70), ".nan"],
        "timesteps": ["[.nan]", "[.inf, 500]", "[1000, -1]", "[1e308]", "'1000'", "[]", "[1000, 1000]"],
        "negative_prompt": ["123", "[a]"],
        "style": ["42"],
    }
    for key, values in numbers.items():
        for v in values:
            add(Case(f"story-{key}={v}", "numbers", gen(), story_with(key, v), outputs=("o.mp4", "o.json")))
    for v in ["0", "-1", ".nan", "1000000000", str(2**70)]:
        add(Case(f"story-repeat={v}", "numbers", gen(), raw_story(f"reference: ref.png\nsteps: 2\nclips: [{{prompt: '{PROMPT}', repeat: {v}}}]\n"),
                 outputs=("o.mp4",)))
    for v in ["-1", str(2**70), ".nan", "1.5"]:
        add(Case(f"story-clip-seed={v}", "numbers", gen(), raw_story(f"reference: ref.png\nsteps: 2\nclips: [{{prompt: '{PROMPT}', seed: {v}}}]\n"),
                 outputs=("o.mp4",)))
    for v in ["-1", "0", "2", ".nan"]:
        add(Case(f"story-motion_frames={v}", "numbers", gen(), raw_story(f"reference: ref.png\nmode: film\nframes: 17\nsteps: 2\nmotion_frames: {v}\nclips: ['{PROMPT}', '{PROMPT}']\n"),
                 outputs=("o.mp4",), expect="ok" if v == "2" else "error"))
    for v in [".nan", ".inf", "1e308", "-.inf"]:
        add(Case(f"story-lora-weight={v}", "numbers", gen(), raw_story(
            f"reference: ref.png\nsteps: 2\nloras: [{{path: {ROOT}/src/cliploom/shapesworld/model/svi_lora.safetensors, weight: {v}, name: x}}]\nclips: ['{PROMPT}']\n"),
            outputs=("o.mp4",)))

    # The same through flags.
    for extra in [("--frames", "nan"), ("--guidance", "nan"), ("--guidance", "inf"), ("--shift", "nan"),
                  ("--shift", "-inf"), ("--fps", "0"), ("--fps", "-1"), ("--seed", "-1"), ("--seed", str(2**70)),
                  ("--clips", "0"), ("--clips", "-3"), ("--clips", "1000000000"), ("--width", "100000"),
                  ("--height", "-16"), ("--steps", str(10**12)), ("--steps", "0"), ("--timesteps", "nan"),
                  ("--timesteps", "1000,inf"), ("--motion-latents", "99"), ("--guidance-low", "nan"),
                  ("--lora", f"{ROOT}/src/cliploom/shapesworld/model/svi_lora.safetensors:nan"),
                  ("--lora", f"{ROOT}/src/cliploom/shapesworld/model/svi_lora.safetensors:inf"),
                  ("--lora", f"{ROOT}/src/cliploom/shapesworld/model/svi_lora.safetensors:1e308"),
                  ("--frames", "1000000001"), ("--frames", str(2**70))]:
        label = "=".join(extra).replace(f"{ROOT}/src/cliploom/shapesworld/model/", "")
        add(Case(f"flag{label}", "numbers", flags(*extra), files(), outputs=("o.mp4",)))

    # Sizes that would exhaust the machine.
    add(Case("story-10000-clips", "sizes", gen(), raw_story("reference: ref.png\nsteps: 2\nclips:\n" + f"  - {PROMPT}\n" * 10000),
             outputs=("o.mp4",), expect="interrupt", interrupt="mid",
             note="10,000 clips is allowed (the limit): the first clip must come as fast as in a short story"))
    add(Case("story-10001-clips", "sizes", gen(), raw_story("reference: ref.png\nsteps: 2\nclips:\n" + f"  - {PROMPT}\n" * 10001),
             outputs=("o.mp4",)))
    add(Case("story-repeat-huge", "sizes", gen(), raw_story(f"reference: ref.png\nclips: [{{prompt: '{PROMPT}', repeat: 99999999}}]\n"), outputs=("o.mp4",)))
    bomb = "a: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']\n"
    for i in range(1, 10):
        bomb += f"{chr(97 + i)}: &{chr(97 + i)} [*{chr(96 + i)},*{chr(96 + i)},*{chr(96 + i)},*{chr(96 + i)},*{chr(96 + i)},*{chr(96 + i)},*{chr(96 + i)},*{chr(96 + i)},*{chr(96 + i)}]\n"
    add(Case("story-yaml-alias-bomb", "sizes", gen(), raw_story(bomb + "clips: *j\nreference: ref.png\n"), outputs=("o.mp4",)))
    add(Case("story-nested-10000", "sizes", gen(), raw_story("clips: " + "[" * 10000 + "]" * 10000 + "\n"), outputs=("o.mp4",)))
    add(Case("story-nested-mapping-5000", "sizes", gen(), raw_story("clips: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n"), outputs=("o.mp4",)))
    add(Case("story-100MB", "sizes", gen(), raw_story(b"# " + b"x" * (100 * 2**20) + b"\nclips: [a]\n"), outputs=("o.mp4",)))
    add(Case("story-prompt-10MB", "sizes", gen(), raw_story(f"reference: ref.png\nsteps: 2\nclips: ['{'a' * 10_000_000}']\n"), outputs=("o.mp4",)))
    add(Case("story-4k-frames-at-4096", "sizes", gen(), story_with("width", "4096\nheight: 4096\nframes: 4001"), outputs=("o.mp4",)))
    add(Case("render-size-100000", "sizes", ["shapesworld", "render", PROMPT, "--size", "100000", "-o", "r.png"], outputs=("r.png",)))
    add(Case("render-size-0", "sizes", ["shapesworld", "render", PROMPT, "--size", "0", "-o", "r.png"], outputs=("r.png",)))
    add(Case("render-size-neg", "sizes", ["shapesworld", "render", PROMPT, "--size", "-8", "-o", "r.png"], outputs=("r.png",)))
    add(Case("render-seed-huge", "sizes", ["shapesworld", "render", PROMPT, "--seed", str(2**70), "-o", "r.png"], outputs=("r.png",)))
    add(Case("model-config-huge-layers", "sizes", ["generate", "s.yaml", "--model", "m", "--out", "o.mp4", "-q"],
             lambda d, s: (tiny_model(edit_json("transformer/config.json", lambda c: c.update(num_layers=10**6, ffn_dim=10**5)))(d, s),
                           yaml_story({**GOOD, "frames": 9})(d, s)), outputs=("o.mp4",)))
    add(Case("model-config-huge-dims", "sizes", ["generate", "s.yaml", "--model", "m", "--out", "o.mp4", "-q"],
             lambda d, s: (tiny_model(edit_json("transformer/config.json", lambda c: c.update(attention_head_dim=2**20)))(d, s),
                           yaml_story({**GOOD, "frames": 9})(d, s)), outputs=("o.mp4",)))
    add(Case("lora-block-1e9", "sizes", gen(), lora_file("l.safetensors", {
        "blocks.1000000000.self_attn.q.lora_A.weight": {"dtype": "F32", "shape": [4, 24], "data_offsets": [0, 384]},
        "blocks.1000000000.self_attn.q.lora_B.weight": {"dtype": "F32", "shape": [24, 4], "data_offsets": [384, 768]}},
        b"\x00" * 768), outputs=("o.mp4",)))

    # Files that are not what they say.
    for name, data in {"bomb": png_header(100_000, 100_000), "bomb-30k": png_header(30_000, 30_000),
                       "truncated": png_header(32, 32)[:40], "text": b"hello", "empty": b""}.items():
        add(Case(f"reference-{name}", "files", gen(), lambda d, s, data=data: (yaml_story(GOOD)(d, s), (d / "ref.png").write_bytes(data)),
                 outputs=("o.mp4",)))
    add(Case("reference-dir", "files", gen(), lambda d, s: (yaml_story({**GOOD, "reference": "refdir"})(d, s), (d / "refdir").mkdir()), outputs=("o.mp4",)))
    add(Case("reference-fifo", "files", gen(), lambda d, s: (yaml_story({**GOOD, "reference": "fifo.png"})(d, s), os.mkfifo(d / "fifo.png")),
             outputs=("o.mp4",), timeout=30))
    add(Case("story-binary", "files", gen(), raw_story(bytes(range(256)) * 40), outputs=("o.mp4",)))
    add(Case("story-utf16", "files", gen(), raw_story(("reference: ref.png\nclips: [a]\n").encode("utf-16")), outputs=("o.mp4",)))
    add(Case("story-list", "files", gen(), raw_story("- a\n- b\n"), outputs=("o.mp4",)))
    add(Case("story-empty", "files", gen(), raw_story(""), outputs=("o.mp4",)))
    add(Case("story-dir", "files", gen(story="sdir"), files(sdir=None), outputs=("o.mp4",)))
    add(Case("story-fifo", "files", gen(story="fifo.yaml"), files(**{"fifo.yaml": "FIFO"}), outputs=("o.mp4",), timeout=30))
    add(Case("story-missing", "files", gen(story="nope.yaml"), files(), outputs=("o.mp4",)))
    add(Case("story-clips-null", "files", gen(), raw_story("reference: ref.png\nclips: ~\n"), outputs=("o.mp4",)))
    add(Case("story-clip-int-prompt", "files", gen(), raw_story("reference: ref.png\nclips: [{prompt: 5}]\n"), outputs=("o.mp4",)))
    add(Case("story-loras-mapping", "files", gen(), raw_story("reference: ref.png\nclips: [a]\nloras: {path: x}\n"), outputs=("o.mp4",)))
    add(Case("story-lora-missing", "files", gen(), yaml_story({**GOOD, "loras": [{"path": "nope.safetensors"}]}), outputs=("o.mp4",)))
    # LoRA files whose headers lie.
    A = {"dtype": "F32", "shape": [4, 24], "data_offsets": [0, 384]}
    B = {"dtype": "F32", "shape": [24, 4], "data_offsets": [384, 768]}
    key = "blocks.0.self_attn.q"
    data768 = b"\x00" * 768
    lies = {
        "entry-not-object": ({f"{key}.lora_A.weight": 5}, b""),
        "entry-list": ({f"{key}.lora_A.weight": [1, 2]}, b""),
        "no-shape": ({f"{key}.lora_A.weight": {"dtype": "F32", "data_offsets": [0, 384]}}, b"\x00" * 384),
        "no-dtype": ({f"{key}.lora_A.weight": {"shape": [4, 24], "data_offsets": [0, 384]}}, b"\x00" * 384),
        "bad-dtype": ({f"{key}.lora_A.weight": {"dtype": "Q9", "shape": [4, 24], "data_offsets": [0, 384]}}, b"\x00" * 384),
        "offsets-beyond-file": ({f"{key}.lora_A.weight": {**A, "data_offsets": [0, 10**9]}}, b"\x00" * 384),
        "offsets-overlap": ({f"{key}.lora_A.weight": A, f"{key}.lora_B.weight": {**B, "data_offsets": [0, 384]}}, data768),
        "shape-size-mismatch": ({f"{key}.lora_A.weight": {**A, "shape": [400, 24]}}, b"\x00" * 384),
        "negative-shape": ({f"{key}.lora_A.weight": {**A, "shape": [-4, 24]}}, b"\x00" * 384),
        "header-not-json": ("{not json", b""),
        "header-list": ("[1,2,3]", b""),
        "header-deep": ('{"a":' * 5000 + "1" + "}" * 5000, b""),
        "metadata-not-strings": ({"__metadata__": {"alpha": [1]}, f"{key}.lora_A.weight": A, f"{key}.lora_B.weight": B}, data768),
        "regex-key": ({"blocks.(.*.lora_A.weight": A, "blocks.[.lora_B.weight": B}, data768),
        "rank0": ({f"{key}.lora_A.weight": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
                   f"{key}.lora_B.weight": {"dtype": "F32", "shape": [], "data_offsets": [4, 8]}}, b"\x00" * 8),
        "rank-zero-dim": ({f"{key}.lora_A.weight": {"dtype": "F32", "shape": [0, 24], "data_offsets": [0, 0]},
                           f"{key}.lora_B.weight": {"dtype": "F32", "shape": [24, 0], "data_offsets": [0, 0]}}, b""),
        "int-dtype": ({f"{key}.lora_A.weight": {**A, "dtype": "I32"}, f"{key}.lora_B.weight": {**B, "dtype": "I32"}}, data768),
        "bool-dtype": ({f"{key}.lora_A.weight": {"dtype": "BOOL", "shape": [4, 24], "data_offsets": [0, 96]},
                        f"{key}.lora_B.weight": {"dtype": "BOOL", "shape": [24, 4], "data_offsets": [96, 192]}}, b"\x00" * 192),
        "alpha-empty": ({f"{key}.lora_A.weight": A, f"{key}.lora_B.weight": B,
                         f"{key}.alpha": {"dtype": "F32", "shape": [0], "data_offsets": [768, 768]}}, data768),
        "alpha-vector": ({f"{key}.lora_A.weight": A, f"{key}.lora_B.weight": B,
                          f"{key}.alpha": {"dtype": "F32", "shape": [3], "data_offsets": [768, 780]}}, data768 + f32(1, 2, 3)),
        "alpha-nan": ({f"{key}.lora_A.weight": A, f"{key}.lora_B.weight": B,
                       f"{key}.alpha": {"dtype": "F32", "shape": [], "data_offsets": [768, 772]}}, data768 + f32(float("nan"))),
        "alpha-string-meta": ({"__metadata__": {"ss_network_alpha": "lots", "ss_network_dim": "x"}, f"{key}.lora_A.weight": A,
                               f"{key}.lora_B.weight": B}, data768),
        "a-only": ({f"{key}.lora_A.weight": A}, b"\x00" * 384),
        "shape-mismatch": ({f"{key}.lora_A.weight": {**A, "shape": [4, 25], "data_offsets": [0, 400]},
                            f"{key}.lora_B.weight": {**B, "data_offsets": [400, 784]}}, b"\x00" * 784),
        "rank-mismatch": ({f"{key}.lora_A.weight": A, f"{key}.lora_B.weight": {**B, "shape": [24, 8], "data_offsets": [384, 1152]}}, b"\x00" * 1152),
        "unknown-keys-only": ({"foo.bar": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 4),
        "empty-header": ({}, b""),
        "header-length-huge": (None, None),
        "truncated": (None, b"short"),
    }
    for name, (header, data) in lies.items():
        if name == "header-length-huge":
            setup = files(**{"l.safetensors": struct.pack("<Q", 2**60) + b"{}"})

            def setup(d, s, inner=setup):
                inner(d, s)
                import yaml

                (d / "s.yaml").write_text(yaml.safe_dump({**GOOD, "loras": [{"path": "l.safetensors"}]}))
        elif name == "truncated":
            def setup(d, s):
                shutil.copy(ROOT / "src/cliploom/shapesworld/model/svi_lora.safetensors", d / "full.safetensors")
                blob = (d / "full.safetensors").read_bytes()
                shutil.copy(s / "ref.png", d / "ref.png")
                (d / "l.safetensors").write_bytes(blob[: len(blob) // 2])
                import yaml

                (d / "s.yaml").write_text(yaml.safe_dump({**GOOD, "loras": [{"path": "l.safetensors"}]}))
        else:
            setup = lora_file("l.safetensors", header, data)
        add(Case(f"lora-{name}", "files", gen(), setup, outputs=("o.mp4",)))
        describable = name in ("alpha-string-meta", "shape-mismatch", "unknown-keys-only", "empty-header")
        add(Case(f"inspect-lora-{name}", "files", ["inspect", "l.safetensors"], setup, expect="ok" if describable else "error",
                 note="inspect describes a file it can read; whether a LoRA fits is a question for a model" if describable else ""))

    def svi_state(transform):
        def setup(d, s):
            from safetensors.torch import load_file

            state = load_file(str(ROOT / "src/cliploom/shapesworld/model/svi_lora.safetensors"))
            state = transform({k: v.float() for k, v in state.items()})
            lora_tensors(state)(d, s)
        return setup

    def with_nan(state):
        k = next(iter(state))
        state[k][0, 0] = float("nan")
        return state

    def with_inf(state):
        k = next(iter(state))
        state[k][0, 0] = float("inf")
        return state

    def overflowing(state):
        return {k: v * 1e19 for k, v in state.items()}  # B @ A overflows float32

    add(Case("lora-nan-values", "files", gen(), svi_state(with_nan), outputs=("o.mp4",)))
    add(Case("lora-inf-values", "files", gen(), svi_state(with_inf), outputs=("o.mp4",)))
    add(Case("lora-overflows-to-inf", "files", gen(), svi_state(overflowing), outputs=("o.mp4",)))
    add(Case("lora-pickle-named-safetensors", "files", gen(), lambda d, s: (
        lora_file("l.safetensors", {})(d, s), (d / "l.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)), outputs=("o.mp4",)))
    add(Case("lora-fifo", "files", gen(), lambda d, s: (yaml_story({**GOOD, "loras": [{"path": "l.safetensors"}]})(d, s),
                                                       os.mkfifo(d / "l.safetensors")), outputs=("o.mp4",), timeout=30))
    add(Case("lora-dir", "files", gen(), lambda d, s: (yaml_story({**GOOD, "loras": [{"path": "l.safetensors"}]})(d, s),
                                                      (d / "l.safetensors").mkdir()), outputs=("o.mp4",)))
    add(Case("inspect-fifo", "files", ["inspect", "f.safetensors"], files(**{"f.safetensors": "FIFO"}), timeout=30))
    add(Case("inspect-missing", "files", ["inspect", "nope.safetensors"], files()))
    add(Case("inspect-text", "files", ["inspect", "t.safetensors"], files(**{"t.safetensors": "hello world"})))
    add(Case("inspect-empty-dir", "files", ["inspect", "d"], files(d=None)))
    add(Case("inspect-dir-of-junk", "files", ["inspect", "d"], files(**{"d__a.safetensors": b"\x00" * 3, "d__model_index.json": "[1]"})))
    add(Case("inspect-dev-zero", "files", ["inspect", "/dev/zero"], files(), timeout=30))

    # Model folders whose JSON is corrupt, a list, or of the wrong types.
    model_edits = {
        "index-corrupt": edit_json("model_index.json", "{"),
        "index-list": edit_json("model_index.json", "[1, 2]"),
        "index-wrong-types": edit_json("model_index.json", lambda c: c.update(transformer=5, vae="x")),
        "index-binary": edit_json("model_index.json", bytes(range(256))),
        "transformer-config-list": edit_json("transformer/config.json", "[]"),
        "transformer-config-corrupt": edit_json("transformer/config.json", '{"num_layers": '),
        "transformer-config-string-layers": edit_json("transformer/config.json", lambda c: c.update(num_layers="two")),
        "transformer-config-negative": edit_json("transformer/config.json", lambda c: c.update(num_layers=-2)),
        "transformer-config-float-heads": edit_json("transformer/config.json", lambda c: c.update(num_attention_heads=2.5)),
        "vae-config-list": edit_json("vae/config.json", "[]"),
        "vae-config-zdim-str": edit_json("vae/config.json", lambda c: c.update(z_dim="16")),
        "settings-list": edit_json("cliploom.json", "[]"),
        "settings-wrong-types": edit_json("cliploom.json", lambda c: c.update(frames="many", width=-3)),
        "settings-nan": edit_json("cliploom.json", lambda c: c.update(shift=float("nan"))),
        "scheduler-corrupt": edit_json("scheduler/scheduler_config.json", "{{"),
        "weights-truncated": lambda m: (m / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(
            (m / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()[:1000]),
        "weights-missing": lambda m: (m / "transformer" / "diffusion_pytorch_model.safetensors").unlink(),
        "tokenizer-missing": lambda m: shutil.rmtree(m / "tokenizer"),
        "weights-nan": lambda m: _nan_weights(m / "transformer" / "diffusion_pytorch_model.safetensors"),
    }
    for name, edit in model_edits.items():
        add(Case(f"model-{name}", "files", ["generate", "s.yaml", "--model", "m", "--out", "o.mp4", "-q"],
                 lambda d, s, edit=edit: (tiny_model(edit)(d, s), yaml_story({**GOOD, "frames": 9})(d, s)), outputs=("o.mp4",)))
        add(Case(f"inspect-model-{name}", "files", ["inspect", "m"], tiny_model(edit),
                 expect="ok" if name == "weights-nan" else "error",
                 note="inspect reads headers, not values: NaN weights are refused when loading" if name == "weights-nan" else ""))
    for name, text in {"family-list": "[]", "family-corrupt": "{", "family-wrong-types": '{"transformer": 5, "vae": []}',
                       "family-huge": '{"transformer": {"num_layers": 100000000, "num_attention_heads": 40, "attention_head_dim": 128, '
                                      '"in_channels": 36, "out_channels": 16, "text_dim": 4096, "ffn_dim": 13824, "freq_dim": 256, '
                                      '"patch_size": [1, 2, 2]}, "vae": {}}'}.items():
        add(Case(f"{name}", "files", ["generate", "s.yaml", "--model", "m", "--family", "fam.json", "--out", "o.mp4", "-q"],
                 lambda d, s, text=text: (files(**{"fam.json": text, "m__x.safetensors": b""})(d, s), yaml_story(GOOD)(d, s)),
                 outputs=("o.mp4",)))

    # Outputs.
    add(Case("out-empty", "outputs", flags(out=""), files(), expect="ok", note='--out "" means no --out: the default name'))
    for name, target in {"proc": "/proc/o.mp4", "sys": "/sys/o.mp4", "proc-dir": "/proc/frames/", "name-300": "a" * 300 + ".mp4",
                         "dot": ".", "avi": "o.avi", "gif": "o.gif", "webm": "o.webm", "mkv": "o.mkv",
                         "parent-is-file": "f.txt/o.mp4", "dev-null": "/dev/null"}.items():
        add(Case(f"out-{name}", "outputs", flags(out=target), files(**{"f.txt": "x"}), outputs=(() if target in (".", "/dev/null", "") else (target,))))
    add(Case("out-report-is-dir", "outputs", flags(out="o.mp4"), files(**{"o.json": None}), outputs=("o.mp4",)))
    add(Case("out-run-dir-is-file", "outputs", flags(out="o.mp4"), files(**{"o.run": "x"}), outputs=("o.mp4",)))
    root = os.geteuid() == 0
    add(Case("out-readonly-dir", "outputs", flags(out="ro/o.mp4"), lambda d, s: (files(ro=None)(d, s), os.chmod(d / "ro", 0o500)),
             outputs=() if root else ("ro/o.mp4",), expect="ok" if root else "error",
             note="root may write into a 0500 folder, and does" if root else ""))
    add(Case("out-readonly-fs", "outputs", flags(out="/sys/fs/o.mp4"), files(), outputs=("/sys/fs/o.mp4",)))
    add(Case("out-disk-full-mp4", "outputs", flags("--clips", "3", out="full/o.mp4"), files(full=None), outputs=("full/o.mp4",)))
    add(Case("out-disk-full-png", "outputs", flags("--clips", "3", out="full/frames/"), files(full=None), outputs=("full/frames",)))
    add(Case("eval-out-blocked", "outputs", ["eval", "v.mp4", "--out", "f.txt"], _finished_video, outputs=()))
    add(Case("eval-out-proc", "outputs", ["eval", "v.mp4", "--out", "/proc/e"], _finished_video))
    add(Case("render-out-blocked", "outputs", ["shapesworld", "render", PROMPT, "-o", "f.txt/r.png"], files(**{"f.txt": "x"})))
    add(Case("render-out-proc", "outputs", ["shapesworld", "render", PROMPT, "-o", "/proc/r.png"], files()))
    add(Case("render-out-dir", "outputs", ["shapesworld", "render", PROMPT, "-o", "d"], files(d=None)))
    add(Case("render-out-jpg-ok", "outputs", ["shapesworld", "render", PROMPT, "-o", "r.jpg"], files(), expect="ok"))
    add(Case("make-tiny-blocked", "outputs", ["make-tiny", "f.txt/m"], files(**{"f.txt": "x"})))
    add(Case("make-tiny-proc", "outputs", ["make-tiny", "/proc/m"], files()))
    add(Case("make-tiny-file", "outputs", ["make-tiny", "f.txt"], files(**{"f.txt": "x"})))
    add(Case("export-out-blocked", "outputs", ["export-lora", "run", "-o", "f.txt/l.safetensors"], _trained_run))
    add(Case("export-out-proc", "outputs", ["export-lora", "run", "-o", "/proc/l.safetensors"], _trained_run))
    add(Case("export-out-dir", "outputs", ["export-lora", "run", "-o", "d"], lambda d, s: (_trained_run(d, s), (d / "d").mkdir())))

    # Ctrl-C.
    for out_name in ("o.mp4", "frames/"):
        for when in ("early", "mid", "twice"):
            add(Case(f"sigint-{when}-{out_name.strip('/')}", "interrupt", flags("--clips", "30", out=out_name), files(),
                     expect="interrupt", interrupt=when, outputs=(out_name.rstrip("/"), "o.json")))
    add(Case("sigint-train", "interrupt", ["train-svi", "t.yaml", "-q"], _train_config({"steps": 1000}), expect="interrupt",
             interrupt="mid", outputs=("run/lora_svi.safetensors",)))

    # Trainer and exporter.
    train_bad = {"frames": 1000000001, "frames-nan": float("nan"), "seed": float("inf"), "lr": float("nan"), "lr-neg": -1.0,
                 "steps": -1, "steps-huge": 10**15, "rank": 0, "rank-huge": 10**9, "out_dir": "/proc/run", "width": 100000,
                 "batch_size": 0, "p_clean": 2.0, "alpha": float("nan"), "unknown_key": 1, "model": "/nonexistent"}
    for name, value in train_bad.items():
        key = name.split("-")[0]
        add(Case(f"train-{name}", "trainer", ["train-svi", "t.yaml", "-q"], _train_config({key: value}),
                 outputs=("run/config.json", "run/train.csv", "run/lora_svi.safetensors")))
    for name, text in {"binary": bytes(range(256)), "utf16": "steps: 2\n".encode("utf-16"), "list": b"[1, 2]",
                       "alias-bomb": bomb.encode() + b"steps: *j\n", "nested": b"steps: " + b"[" * 10000 + b"]" * 10000}.items():
        add(Case(f"train-config-{name}", "trainer", ["train-svi", "t.yaml", "-q"], files(**{"t.yaml": text}),
                 outputs=("runs", "run")))
    add(Case("train-config-empty", "trainer", ["train-svi", "t.yaml", "-q"], files(**{"t.yaml": b""}), expect="interrupt",
             interrupt="mid", note="an empty config is every default (documented): it trains"))
    add(Case("train-max-steps-neg", "trainer", ["train-svi", "t.yaml", "--max-steps", "-5", "-q"], _train_config({})))
    add(Case("train-steps-flag-nan", "trainer", ["train-svi", "t.yaml", "--steps", "nan", "-q"], _train_config({})))
    add(Case("export-missing", "trainer", ["export-lora", "nope", "-o", "l.safetensors"], files(), outputs=("l.safetensors",)))
    add(Case("export-no-config", "trainer", ["export-lora", "run", "-o", "l.safetensors"],
             lambda d, s: (_trained_run(d, s), _edit_state(d, lambda st: st.pop("config"))), outputs=("l.safetensors",)))
    add(Case("export-state-corrupt", "trainer", ["export-lora", "run", "-o", "l.safetensors"],
             lambda d, s: (_trained_run(d, s), [p.write_text("{") for p in (d / "run").rglob("state.json")]), outputs=("l.safetensors",)))
    add(Case("export-lora-truncated", "trainer", ["export-lora", "run", "-o", "l.safetensors"],
             lambda d, s: (_trained_run(d, s), [p.write_bytes(p.read_bytes()[:100]) for p in (d / "run").rglob("lora.safetensors")]),
             outputs=("l.safetensors",)))
    add(Case("export-lora-pickled", "trainer", ["export-lora", "run", "-o", "l.safetensors"],
             lambda d, s: (_trained_run(d, s), [p.write_bytes(b"\x80\x04\x95" + b"\x00" * 200) for p in (d / "run").rglob("lora.safetensors")]),
             outputs=("l.safetensors",)))
    add(Case("export-lora-nan", "trainer", ["export-lora", "run", "-o", "l.safetensors"],
             lambda d, s: (_trained_run(d, s), _nan_checkpoint(d)), outputs=("l.safetensors",)))

    # eval on hostile videos and reports.
    add(Case("eval-missing", "files", ["eval", "nope.mp4"], files()))
    add(Case("eval-truncated", "files", ["eval", "v.mp4"], lambda d, s: (_finished_video(d, s), (d / "v.mp4").write_bytes((d / "v.mp4").read_bytes()[:300]))))
    add(Case("eval-text-as-video", "files", ["eval", "v.mp4"], files(**{"v.mp4": "not a video"})))
    add(Case("eval-report-corrupt", "files", ["eval", "v.mp4"], lambda d, s: (_finished_video(d, s), (d / "v.json").write_text("{"))))
    add(Case("eval-report-list", "files", ["eval", "v.mp4"], lambda d, s: (_finished_video(d, s), (d / "v.json").write_text("[]"))))
    add(Case("eval-report-lies", "files", ["eval", "v.mp4"], lambda d, s: (_finished_video(d, s), (d / "v.json").write_text(
        json.dumps({"clips": [{"prompt": PROMPT, "frames_kept": 10**9}]})))))
    add(Case("eval-report-neg", "files", ["eval", "v.mp4"], lambda d, s: (_finished_video(d, s), (d / "v.json").write_text(
        json.dumps({"clips": [{"prompt": PROMPT, "frames_kept": -5}]})))))
    add(Case("eval-story-binary", "files", ["eval", "v.mp4", "--story", "s.yaml"], lambda d, s: (_finished_video(d, s), (d / "s.yaml").write_bytes(bytes(range(256))))))
    add(Case("eval-fifo", "files", ["eval", "f.mp4"], files(**{"f.mp4": "FIFO"}), timeout=30))
    add(Case("eval-empty-dir", "files", ["eval", "d"], files(d=None)))

    # Usage errors: the short form.
    for name, argv in {"unknown-flag": ["generate", "--bogus"], "no-command": [], "bad-int": ["generate", "--frames", "x"],
                       "missing-value": ["generate", "--out"], "bad-choice": ["make-tiny", "d", "--variant", "wan9"],
                       "render-no-out": ["shapesworld", "render", PROMPT]}.items():
        add(Case(f"usage-{name}", "usage", argv, files()))

    # And what must work.
    add(Case("good-story", "baseline", gen(), yaml_story(GOOD), expect="ok"))
    add(Case("good-flags-png", "baseline", flags(out="frames/"), files(), expect="ok"))
    return out


def _nan_weights(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    k = next(k for k, v in state.items() if v.dim() == 2)
    state[k][0, 0] = float("nan")
    save_file(state, str(path))


def _finished_video(d: Path, shared: Path) -> None:
    shutil.copy(shared / "ref.png", d / "ref.png")
    shutil.copy(shared / "v.mp4", d / "v.mp4")
    shutil.copy(shared / "v.json", d / "v.json")
    (d / "f.txt").write_text("x")


def _train_config(values: dict):
    def setup(d: Path, shared: Path) -> None:
        import yaml

        base = {"model": "builtin", "out_dir": "run", "steps": 2, "checkpoint_every": 1, "rank": 4}
        (d / "t.yaml").write_text(yaml.safe_dump({**base, **values}))
    return setup


def _trained_run(d: Path, shared: Path) -> None:
    shutil.copytree(shared / "run", d / "run")
    (d / "f.txt").write_text("x")


def _edit_state(d: Path, change) -> None:
    for p in (d / "run").rglob("state.json"):
        state = json.loads(p.read_text())
        change(state)
        p.write_text(json.dumps(state))


def _nan_checkpoint(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    for p in (d / "run").rglob("lora.safetensors"):
        state = load_file(str(p))
        k = next(iter(state))
        state[k].view(-1)[0] = float("nan")
        save_file(state, str(p))


# -- running ------------------------------------------------------------------------------------------


def prepare_shared(shared: Path) -> None:
    """What cases copy: a reference, a finished video and report, a tiny model, a trained run."""
    from cliploom.cli import main as cli
    from cliploom.models import make_tiny
    from cliploom.shapesworld import render_reference

    render_reference(PROMPT, size=32).save(shared / "ref.png")
    make_tiny(shared / "tiny", "wan21")
    env_cli = [sys.executable, "-m", "cliploom.cli"]
    subprocess.run(env_cli + ["generate", "--image", str(shared / "ref.png"), "--prompt", PROMPT, "--steps", "2",
                              "--clips", "2", "--out", str(shared / "v.mp4"), "-q"], check=True, capture_output=True)
    import yaml

    (shared / "t.yaml").write_text(yaml.safe_dump({"model": "builtin", "out_dir": str(shared / "run"), "steps": 1,
                                                    "checkpoint_every": 1, "rank": 4}))
    subprocess.run(env_cli + ["train-svi", str(shared / "t.yaml"), "-q"], check=True, capture_output=True)
    del cli


def _limit(memory_gb: float):
    def apply() -> None:
        limit = int(memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        os.setsid()
        # Ctrl-C as in a terminal, even when the probe itself runs in the background (where the
        # shell ignores SIGINT for its children, and Python would then keep ignoring it).
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    return apply


def run_case(case: Case, shared: Path, root: Path, memory_gb: float, mount_ok: bool, log: Path | None = None) -> dict:
    try:
        result = _run_case(case, shared, root, memory_gb, mount_ok)
    except Exception as e:  # noqa: BLE001 - a broken case must not lose the others' results
        result = {"status": "fail", "problems": [f"probe error: {type(e).__name__}: {str(e)[:200]}"], "exit": None,
                  "seconds": 0, "stderr": "", "stderr_lines": 0, "peak_rss_mb_upper": 0}
    if log is not None:
        with open(log, "a") as f:
            f.write(json.dumps({"id": case.id, **result}) + "\n")
    return result


def _run_case(case: Case, shared: Path, root: Path, memory_gb: float, mount_ok: bool) -> dict:
    d = root / case.id.replace("/", "_")[:100]
    d.mkdir(parents=True)
    if case.setup is not None:
        case.setup(d, shared)
    if case.id.startswith("out-disk-full"):
        if not mount_ok:
            return {"status": "skipped", "why": "cannot mount a small tmpfs (needs root)"}
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d / "full")], check=True)
    env = {**os.environ, "CLIPLOOM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cliploom.cli", *case.argv], cwd=d, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=_limit(memory_gb))
    hung = False
    streams: dict = {}
    readers = [threading.Thread(target=lambda k=k, f=f: streams.__setitem__(k, f.read()), daemon=True)
               for k, f in (("out", proc.stdout), ("err", proc.stderr))]
    for r in readers:
        r.start()
    peak_kb = 0
    deadline = time.monotonic() + case.timeout
    interrupted = case.interrupt is None
    while proc.poll() is None:
        peak_kb = max(peak_kb, _peak_rss_kb(proc.pid))  # VmHWM: the process's own high-water mark
        if not interrupted:
            interrupted = _interrupt_due(proc, case, d, started)
        if time.monotonic() > deadline:
            hung = True
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    for r in readers:
        r.join()
    err = streams.get("err", b"")
    seconds = time.perf_counter() - started
    err_text = err.decode(errors="replace")
    lines = [ln for ln in err_text.splitlines() if ln.strip()]
    left = [o for o in case.outputs if o and os.path.lexists(d / o)]
    want = {"error": 2, "ok": 0, "interrupt": 130}[case.expect]
    problems = []
    if hung:
        problems.append("hang")
    elif "Traceback" in err_text:
        problems.append("traceback")
    elif proc.returncode != want:
        problems.append(f"exit {proc.returncode}")
    if case.expect == "error" and not hung and (len(lines) != 1 or not lines[0].startswith("error:")):
        problems.append(f"{len(lines)} stderr lines")
    if case.expect != "ok" and left:
        problems.append("left " + ", ".join(left))
    if case.id.startswith("out-disk-full"):
        subprocess.run(["umount", str(d / "full")], check=False)
    return {"status": "pass" if not problems else "fail", "problems": problems, "exit": proc.returncode,
            "seconds": round(seconds, 2), "stderr": lines[-1][:300] if lines else "", "stderr_lines": len(lines),
            "peak_rss_mb": round(peak_kb / 1024)}


def _peak_rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _interrupt_due(proc: subprocess.Popen, case: Case, d: Path, started: float) -> bool:
    """Send Ctrl-C when the case's moment has come (early: after 1 s; mid: once a clip or a
    checkpoint exists, at the latest after 60 s); True once sent."""
    elapsed = time.perf_counter() - started
    if case.interrupt == "early":
        due = elapsed >= 1.0
    else:
        due = elapsed >= 60 or bool(list(d.glob("*.run/clips/000000.json")) or list(d.glob("run/checkpoints/*")))
    if not due:
        return False
    proc.send_signal(signal.SIGINT)
    if case.interrupt == "twice":
        time.sleep(0.1)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    return True


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="run the cases of one category (or whose id contains this text)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--memory-gb", type=float, default=8.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hostile.json"))
    ap.add_argument("--docs", default=str(ROOT / "docs" / "reliability.md"))
    args = ap.parse_args(argv)
    chosen = [c for c in cases() if not args.only or args.only == c.category or args.only in c.id]
    ids = [c.id for c in chosen]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    with tempfile.TemporaryDirectory() as tmp:
        shared, root = Path(tmp) / "shared", Path(tmp) / "cases"
        shared.mkdir()
        root.mkdir()
        prepare_shared(shared)
        mount_ok = os.geteuid() == 0 and shutil.which("mount") is not None
        started = time.perf_counter()
        log = Path(args.out).with_suffix(".jsonl")
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("")
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda c: run_case(c, shared, root, args.memory_gb, mount_ok, log), chosen))
        wall = time.perf_counter() - started
    for case, result in zip(chosen, results):
        case.result = result
    report = summarise(chosen, wall)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if not args.only:
        write_docs(Path(args.docs), report)
    t = report["totals"]
    print(f"{t['cases']} cases: {t['pass']} pass, {t['fail']} fail ({t['traceback']} tracebacks, {t['hang']} hangs), "
          f"{t['skipped']} skipped, {wall:.0f} s")
    for c in report["failures"]:
        print(f"  FAIL {c['id']}: {', '.join(c['problems'])} | {c['stderr'][:160]}")
    return report


def summarise(chosen: list[Case], wall: float) -> dict:
    cats: dict = {}
    for c in chosen:
        r = c.result
        cat = cats.setdefault(c.category, {"cases": 0, "pass": 0, "fail": 0, "traceback": 0, "hang": 0, "skipped": 0,
                                           "max_seconds": 0.0, "peak_rss_mb": 0})
        cat["peak_rss_mb"] = max(cat["peak_rss_mb"], r.get("peak_rss_mb", 0))
        cat["cases"] += 1
        cat[r["status"] if r["status"] != "skipped" else "skipped"] += 1
        cat["traceback"] += "traceback" in r.get("problems", [])
        cat["hang"] += "hang" in r.get("problems", [])
        cat["max_seconds"] = max(cat["max_seconds"], r.get("seconds", 0))
    totals = {k: sum(c[k] for c in cats.values()) for k in ("cases", "pass", "fail", "traceback", "hang", "skipped")}
    return {"totals": totals, "wall_seconds": round(wall), "categories": cats,
            "failures": [{"id": c.id, **c.result} for c in chosen if c.result["status"] == "fail"],
            "documented": [{"id": c.id, "expect": c.expect, "note": c.note} for c in chosen if c.note],
            "cases": [{"id": c.id, "category": c.category, "expect": c.expect, **c.result} for c in chosen]}


def write_docs(path: Path, report: dict) -> None:
    t = report["totals"]
    lines = [
        "# Reliability: hostile input",
        "",
        "The contract: bad input is one line on stderr (`error: ...`) and exit code 2; Ctrl-C exits 130;",
        "never a traceback, a hang, an unbounded allocation, or a file that looks finished.",
        "",
        f"Command: `make bench-hostile` (`python benchmarks/hostile.py`), {t['cases']} cases, each a real",
        "`cliploom` process with one thread and an 8 GB address-space limit, two at a time; results in",
        f"`benchmarks/results/hostile.json`. Wall time {report['wall_seconds']} s on the 2-core machine.",
        "",
        f"**{t['pass']} of {t['cases'] - t['skipped']} cases meet the contract** ({t['traceback']} tracebacks, {t['hang']} hangs, "
        f"{t['skipped']} skipped).",
        "",
        "| category | cases | pass | fail | tracebacks | hangs | skipped | slowest case (s) | peak memory of a case (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in report["categories"].items():
        lines.append(f"| {name} | {c['cases']} | {c['pass']} | {c['fail']} | {c['traceback']} | {c['hang']} | {c['skipped']} | "
                     f"{c['max_seconds']:.1f} | {c['peak_rss_mb']} |")
    lines += ["", "Peak memory is each process's own high-water mark (`VmHWM`); a generating case holds the built-in",
              "model, torch and one clip. Cases where a behaviour other than exit 2 is right, and why:", ""]
    lines += [f"- `{c['id']}` (expects {c['expect']}): {c['note']}" for c in report["documented"]]
    if report["failures"]:
        lines += ["", "Cases that still fail:", ""]
        lines += [f"- `{c['id']}`: {', '.join(c['problems'])} ({c['stderr'][:120]})" for c in report["failures"]]
    lines += ["", "<!-- hostile:end -->", ""]
    old = path.read_text() if path.exists() else ""
    tail = old.split("<!-- hostile:end -->", 1)[1] if "<!-- hostile:end -->" in old else ""
    path.write_text("\n".join(lines) + tail.lstrip("\n"))


if __name__ == "__main__":
    main()
