"""Checkpoints as safetensors + JSON: nothing here is ever unpickled.

A checkpoint is a folder ``out_dir/checkpoints/step-0000100/``:

* ``lora.safetensors`` - the adapter (diffusers module names, float32, unscaled);
* ``optimizer.safetensors`` - the optimizer's tensors (``state.<param>.<name>``), its other
  values and param groups in ``state.json``;
* ``replay-rank<r>.safetensors`` - each process's replay memories;
* ``rng-rank<r>.safetensors`` - each process's global torch RNG state(s);
* ``state.json`` - the step, the config, the optimizer's non-tensor state, Python's RNG state.

It is written under ``step-N.partial`` and renamed when complete, so a crash never leaves a
checkpoint that looks finished.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch

from ..errors import CliploomError

CHECKPOINTS = "checkpoints"
_STEP = re.compile(r"^step-(\d+)$")


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return out_dir / CHECKPOINTS / f"step-{step:07d}"


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    root = out_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP.match(p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_checkpoint(path: Path) -> Path:
    """``path`` itself if it is a checkpoint folder, else the latest checkpoint of the run folder ``path``."""
    if (path / "state.json").is_file() and (path / "lora.safetensors").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise CliploomError(f"{path} is neither a checkpoint nor a run folder with checkpoints",
                            "pass out_dir of a `cliploom train-svi` run or one of its checkpoints/step-N folders")
    return found[-1][1]


# -- optimizer state <-> tensors + JSON --------------------------------------------------------------

def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, values in state["state"].items():
        plain["state"][str(index)] = {}
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain["state"][str(index)][name] = value
    return tensors, plain


def unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state: dict = {int(i): dict(v) for i, v in plain["state"].items()}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": plain["param_groups"]}


# -- RNG ---------------------------------------------------------------------------------------------

def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def restore_python_rng(state: list) -> None:
    version, internal, gauss = state
    random.setstate((version, tuple(internal), gauss))


# -- reading and writing -----------------------------------------------------------------------------

def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def _load(path: Path) -> dict[str, torch.Tensor]:
    from ..models.formats import check_finite, load_tensors, read_header

    if not path.is_file():
        raise CliploomError(f"checkpoint file {path} is missing", "resume from another checkpoint or start afresh")
    read_header(path, "checkpoint file")  # pickles and damaged headers are refused here
    tensors = load_tensors(path, "checkpoint file")
    check_finite(tensors, f"checkpoint file {path}")
    return tensors


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def staging_dir(out_dir: Path, step: int) -> Path:
    final = checkpoint_dir(out_dir, step)
    return final.with_name(final.name + ".partial")


def write_main(stage: Path, step: int, lora: dict, optimizer_state: dict, config: dict, extra: dict) -> None:
    """The main process's part: LoRA, optimizer, state.json."""
    _save(lora, stage / "lora.safetensors")
    tensors, plain = flatten_optimizer(optimizer_state)
    _save(tensors, stage / "optimizer.safetensors")
    state = {"step": step, "config": config, "optimizer": plain, "python_rng": python_rng_state(), **extra}
    write_json(stage / "state.json", state)


def write_process(stage: Path, rank: int, replay: dict[str, torch.Tensor]) -> None:
    """Every process's part: its replay memories and RNG state."""
    _save(replay, stage / f"replay-rank{rank}.safetensors")
    _save(rng_tensors(), stage / f"rng-rank{rank}.safetensors")


def finish(out_dir: Path, step: int, keep: int) -> Path:
    """Rename the staged checkpoint into place and drop all but the newest ``keep``."""
    stage, final = staging_dir(out_dir, step), checkpoint_dir(out_dir, step)
    if final.exists():
        shutil.rmtree(final)
    stage.rename(final)
    for _, old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(folder: Path) -> dict:
    from ..inputs import read_json

    state = read_json(folder / "state.json", "checkpoint state", "resume from another checkpoint")
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict) or not isinstance(state.get("step"), int):
        raise CliploomError(f"checkpoint state {folder / 'state.json'} lacks its step or config",
                            "use another checkpoint of the run")
    return state


def read_checkpoint_lora(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return _load(folder / "lora.safetensors"), read_state(folder)


def read_optimizer(folder: Path, state: dict) -> dict:
    return unflatten_optimizer(_load(folder / "optimizer.safetensors"), state["optimizer"])


def read_process(folder: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return _load(folder / f"replay-rank{rank}.safetensors"), _load(folder / f"rng-rank{rank}.safetensors")
