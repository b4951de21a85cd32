"""Opening a Wan image-to-video model, offline: diffusers folders, or original-format files.

Two ways in:

* a **diffusers folder** (``model_index.json``, ``transformer/``, ``vae/``, ...), as published in
  the ``*-Diffusers`` repositories or written by ``cliploom make-tiny``;
* a **folder of original files** plus a model **family** (``family="wan21-i2v-14b-480p"``, or a
  family JSON file of your own): the DiT as original Wan / ComfyUI safetensors (single file or
  shards; Wan 2.2 A14B: ``high_noise_model/`` + ``low_noise_model/``, or two files named
  ``*high_noise*`` / ``*low_noise*``), the VAE as an original Wan 2.1 / 2.2 safetensors file, and
  ``text_encoder/``, ``tokenizer/`` (or ``google/umt5-xxl/``), ``image_encoder/`` +
  ``image_processor/`` as transformers folders. The family's config (shipped in
  ``models/configs/``) supplies what the files do not say; nothing is ever fetched.

See ``docs/formats.md`` for the layouts and examples.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CliploomError
from . import formats
from .components import SETTINGS_FILE, Components, ModelSettings, read_settings
from .quiet import quiet_hf

# Nothing is ever fetched: every file must be on disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = logging.getLogger(__name__)

REQUIRED = ("transformer", "vae", "text_encoder", "tokenizer")
FAMILY_DIR = Path(__file__).resolve().parent / "configs"
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".pkl")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def read_json(path: Path, what: str) -> dict:
    """A JSON object of a model folder (bounded, regular file, UTF-8), or a one-line error."""
    from ..inputs import read_json as read

    data = read(path, what, "check that the model folder is complete", max_bytes=64 * 2**20)
    if not isinstance(data, dict):
        raise CliploomError(f"{what} {path} is not a JSON object", "check that the model folder is complete")
    return data


WEIGHTED = ("transformer", "transformer_2", "vae", "text_encoder", "image_encoder")


def _load(loader, folder: Path, name: str, **kwargs):
    if "torch_dtype" in kwargs:  # a model with weights: safetensors only, never a pickled .bin
        check_weights(folder / name)
        kwargs["use_safetensors"] = True
    try:
        return loader.from_pretrained(folder / name, local_files_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CliploomError(
            f"cannot load {name}/ of model {folder}: {first}",
            "check that the folder is a complete diffusers-layout Wan model",
        ) from None


def check_weights(folder: Path) -> list[Path]:
    """A component folder's safetensors weights, each with a header safetensors accepts."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES)
        why = f" (only {', '.join(pickles)}: PyTorch pickles, which cliploom never loads)" if pickles else ""
        raise CliploomError(f"{folder} holds no .safetensors weights{why}", formats.CONVERT_HINT if pickles else
                            "copy the complete model folder")
    for f in files:
        formats.read_header(f, "weight file")
    return files


def clip_image_processor():
    """CLIP's image processor on PIL: what transformers falls back to without torchvision (with a
    warning), chosen outright so the CLIP input is the same with or without torchvision installed."""
    try:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:  # transformers before 5: the PIL processor is the only one
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


# -- families ------------------------------------------------------------------------------------

_FAMILY_KEYS = {"name", "description", "transformer", "vae", "experts", "image_encoder", "boundary_ratio",
                "expand_timesteps", "settings", "routes"}
_SETTING_KEYS = {f.name for f in dataclasses.fields(ModelSettings)} - {"family", "boundary_ratio", "expand_timesteps"}


def family_names() -> list[str]:
    return sorted(p.stem for p in FAMILY_DIR.glob("*.json"))


def load_family(family: str | os.PathLike) -> dict:
    """A shipped family config by name, or a family JSON file of the same schema."""
    text = str(family)
    shipped = FAMILY_DIR / f"{text}.json"
    path = shipped if shipped.is_file() else Path(text).expanduser()
    if not path.is_file():
        raise CliploomError(
            f"unknown model family {text!r}",
            f"use one of {', '.join(family_names())}, or a family JSON file (see docs/formats.md)",
        )
    cfg = read_json(path, "family config")
    where = f"family config {path}"
    if not isinstance(cfg, dict):
        raise CliploomError(f"{where} is not a JSON object", "see docs/formats.md for the schema")
    unknown = sorted(set(cfg) - _FAMILY_KEYS)
    missing = sorted({"transformer", "vae"} - set(cfg))
    if unknown or missing:
        problem = f"unknown keys {unknown}" if unknown else f"missing {missing}"
        raise CliploomError(f"{where}: {problem}", f"valid keys are {', '.join(sorted(_FAMILY_KEYS))}")
    if cfg.get("experts", 1) not in (1, 2):
        raise CliploomError(f"{where}: experts must be 1 or 2, got {cfg.get('experts')!r}", "use 2 for Wan 2.2 A14B")
    bad = sorted(set(cfg.get("settings") or {}) - _SETTING_KEYS)
    if bad:
        raise CliploomError(f"{where}: unknown settings {bad}", f"valid settings are {', '.join(sorted(_SETTING_KEYS))}")
    cfg.setdefault("name", path.stem)
    cfg.setdefault("experts", 1)
    cfg["path"] = str(path)
    return cfg


def family_settings(family: dict, folder: Path) -> ModelSettings:
    """The family's defaults, then the folder's ``cliploom.json`` over them."""
    values = dict(family.get("settings") or {})
    values["family"] = family["name"]
    values["boundary_ratio"] = family.get("boundary_ratio")
    values["expand_timesteps"] = bool(family.get("expand_timesteps", False))
    own = folder / SETTINGS_FILE
    if own.is_file():
        values.update({k: v for k, v in read_json(own, "settings").items() if k in _SETTING_KEYS | {"family"}})
    return ModelSettings.checked(values, str(folder))


def matching_families(signature: dict) -> list[str]:
    """The shipped families whose transformer has the architecture ``signature`` describes."""
    out = []
    for name in family_names():
        cfg = load_family(name)
        if not formats.signature_mismatches(signature, formats.config_signature(cfg["transformer"])):
            out.append(name)
    return out


# -- original-format folders ---------------------------------------------------------------------


@dataclass
class OriginalFiles:
    """Where the parts of an original-format model are."""

    folder: Path
    experts: list[list[Path]]  # DiT shard files, one list per expert (high noise first)
    dit_layouts: list[str]
    vae: Path  # a safetensors file, or a diffusers vae/ folder
    vae_layout: str
    text_encoder: Path
    tokenizer: Path
    image_encoder: Path | None = None
    image_processor: Path | None = None


def _classified(files) -> list[tuple[Path, formats.Header, dict]]:
    out = []
    for f in files:
        header = formats.read_header(f)
        out.append((f, header, formats.classify(header)))
    return out


def _shards(folder: Path, candidates: list[tuple[Path, formats.Header, dict]], where: str) -> list[Path]:
    """The DiT files of one model: those named by a ``*.safetensors.index.json``, else all of them,
    which must then be shards of one checkpoint (no key in two files)."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    dits = [(f, h) for f, h, c in candidates if c["kind"] == "dit"]
    if indexes and len(indexes) == 1:
        weight_map = read_json(indexes[0], "shard index").get("weight_map") or {}
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CliploomError(f"{where}: shards {missing[:3]} named by {indexes[0].name} are missing", "copy every shard")
        return [folder / n for n in names]
    seen: dict[str, Path] = {}
    for f, header in dits:
        for key in header.keys:
            if key in seen:
                raise CliploomError(
                    f"{where} holds several DiT checkpoints ({seen[key].name} and {f.name} both have {key})",
                    "keep one checkpoint in the folder, or pass the file itself as the model",
                )
            seen[key] = f
    return [f for f, _ in dits]


def _describe(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") if names else "nothing"


def _pickle_hint(folder: Path, what: str) -> str:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        return (f"{', '.join(pickles[:3])} {'is a' if len(pickles) == 1 else 'are'} PyTorch pickle(s), which cliploom "
                f"never loads: {formats.CONVERT_HINT}")
    return f"put the {what} in the folder (see docs/formats.md)"


def find_original_files(model: Path, family: dict) -> OriginalFiles:
    """Find the DiT, VAE and encoders of an original-format model for ``family``."""
    folder = model.parent if model.is_file() else model
    where = f"model {model}"
    if not folder.is_dir():
        raise CliploomError(f"{where} does not exist", "pass the folder (or DiT file) of an original-format model")
    top = _classified(sorted(folder.glob("*.safetensors")))

    # The DiT, one list of shards per expert (GGUF: one file per expert).
    ggufs = _gguf_dits(model, folder, family, where, any(kind["kind"] == "dit" for _, _, kind in top))
    if ggufs is not None:
        experts = [[f] for f in ggufs]
    elif model.is_file():
        (f, header, kind), = _classified([model])
        if kind["kind"] != "dit":
            raise CliploomError(f"{model} is not a Wan DiT checkpoint (it holds {kind['kind']} weights)",
                                "pass the DiT file or its folder; `cliploom inspect FILE` says what a file is")
        if family["experts"] == 2:
            raise CliploomError(f"family {family['name']} has two experts; {model} is one file",
                                "pass the folder that holds both (high_noise_model/ + low_noise_model/)")
        experts = [[model]]
    elif family["experts"] == 2:
        subdirs = [folder / "high_noise_model", folder / "low_noise_model"]
        if all(d.is_dir() for d in subdirs):
            experts = [_shards(d, _classified(sorted(d.glob("*.safetensors"))), f"{where}: {d.name}/") for d in subdirs]
        else:
            by_expert: dict[str, list] = {"high": [], "low": []}
            for f, header, kind in top:
                if kind["kind"] == "dit":
                    expert = formats.expert_from_name(f)
                    if expert is None:
                        raise CliploomError(
                            f"{where}: cannot tell which Wan 2.2 expert {f.name} is",
                            "name it *high_noise* / *low_noise*, or use high_noise_model/ and low_noise_model/",
                        )
                    by_expert[expert].append((f, header, kind))
            experts = [_shards(folder, by_expert[e], f"{where} ({e}-noise expert)") for e in ("high", "low")]
        for name, files in zip(("high-noise", "low-noise"), experts):
            if not files:
                raise CliploomError(f"{where} has no {name} expert DiT (it has {_describe(folder)})",
                                    "add high_noise_model/ and low_noise_model/ (or *_high_noise* / *_low_noise* files)")
    else:
        experts = [_shards(folder, top, where)]
    if not experts[0]:
        raise CliploomError(f"{where} has no Wan DiT safetensors (it has {_describe(folder)})", _pickle_hint(folder, "DiT"))
    dit_layouts = []
    for files in experts:
        if files[0].suffix == ".gguf":
            dit_layouts.append("gguf")
            continue
        keys = [k for f in files for k in formats.read_header(f).keys]
        layout = formats.detect_dit_layout(keys)
        if layout is None:
            raise CliploomError(f"{where}: {files[0].name} is not a Wan DiT checkpoint", "`cliploom inspect FILE` says what it is")
        dit_layouts.append(layout)

    # The VAE: a diffusers vae/ folder, or one original Wan VAE file (of the family's generation).
    if (folder / "vae" / "config.json").is_file():
        vae, vae_layout = folder / "vae", "folder"
    else:
        vaes = [(f, c["layout"]) for f, _, c in top if c["kind"] == "vae"]
        wanted = "wan22" if family["vae"].get("is_residual") else "wan21"
        if len(vaes) > 1:
            vaes = [v for v in vaes if v[1] in (wanted, "diffusers")] or vaes
        if not vaes:
            raise CliploomError(f"{where} has no VAE safetensors (it has {_describe(folder)})", _pickle_hint(folder, "VAE"))
        if len(vaes) > 1:
            raise CliploomError(f"{where} has several VAE files: {', '.join(f.name for f, _ in vaes)}", "keep one")
        vae, vae_layout = vaes[0]
        if vae_layout not in (wanted, "diffusers"):
            names = {"wan21": "Wan 2.1", "wan22": "Wan 2.2"}
            raise CliploomError(
                f"{where}: {vae.name} is a {names[vae_layout]} VAE, family {family['name']} needs a {names[wanted]} VAE",
                "use the VAE released with the model",
            )

    # Encoders: transformers folders.
    text_encoder = folder / "text_encoder"
    if not (text_encoder / "config.json").is_file():
        single = [f.name for f, _, c in top if c["kind"] == "text_encoder"]
        raise CliploomError(
            f"{where} has no text_encoder/ folder"
            + (f" ({single[0]} is a single-file text encoder, which cliploom does not load)" if single else ""),
            "copy text_encoder/ (UMT5-XXL, transformers layout) from the model's -Diffusers release; "
            "the original models_t5_*.pth is a pickle cliploom does not load",
        )
    tokenizer = next((d for d in (folder / "tokenizer", folder / "google" / "umt5-xxl") if d.is_dir()), None)
    if tokenizer is None:
        raise CliploomError(f"{where} has no tokenizer/ (or google/umt5-xxl/) folder", "copy the UMT5 tokenizer folder")
    image_encoder = image_processor = None
    if family.get("image_encoder"):
        image_encoder, image_processor = folder / "image_encoder", folder / "image_processor"
        for d in (image_encoder, image_processor):
            if not d.is_dir():
                raise CliploomError(
                    f"{where} has no {d.name}/ folder, which family {family['name']} needs",
                    f"copy {d.name}/ (CLIP ViT-H, transformers layout) from the model's -Diffusers release",
                )
    return OriginalFiles(folder, experts, dit_layouts, vae, vae_layout, text_encoder, tokenizer,
                         image_encoder, image_processor)


def _gguf_dits(model: Path, folder: Path, family: dict, where: str, safetensors_dit: bool) -> list[Path] | None:
    """The GGUF DiT file(s) of an original-format model (city96 / QuantStack quantisations), one
    per expert; None when the DiT is not GGUF."""
    from ..inputs import check_regular

    if model.is_file():
        if model.suffix != ".gguf":
            return None
        if family["experts"] == 2:
            raise CliploomError(f"family {family['name']} has two experts; {model} is one file",
                                "pass the folder that holds both GGUF files (*high_noise* and *low_noise*)")
        return [check_regular(model, "GGUF DiT", "pass a .gguf file")]
    files = sorted(folder.glob("*.gguf"))
    subdirs = [folder / "high_noise_model", folder / "low_noise_model"]
    if family["experts"] == 2 and all(d.is_dir() for d in subdirs):
        files = [f for d in subdirs for f in sorted(d.glob("*.gguf"))]
    if not files or safetensors_dit:
        return None
    if family["experts"] == 1:
        if len(files) > 1:
            raise CliploomError(f"{where} holds several GGUF DiTs: {', '.join(f.name for f in files)}", "keep one")
        return files
    by = {formats.expert_from_name(f) or ("high" if "high_noise_model" in f.parts else "low" if "low_noise_model" in f.parts else None): f
          for f in files}
    if set(by) != {"high", "low"}:
        raise CliploomError(f"{where}: cannot tell the high- and low-noise GGUF experts apart ({', '.join(f.name for f in files)})",
                            "name them *high_noise* / *low_noise*, or use high_noise_model/ and low_noise_model/")
    return [by["high"], by["low"]]


def load_gguf_transformer(path: Path, config: dict, dtype: torch.dtype, where: str):
    """A GGUF DiT through diffusers' own GGUF support: weights stay quantised (Q8_0, Q5_K, Q4_K ...)
    and each layer dequantises for its matmul in ``dtype``."""
    import tempfile

    from diffusers import GGUFQuantizationConfig, WanTransformer3DModel

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise CliploomError("GGUF models need the gguf package", "pip install gguf") from None
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {k: v for k, v in config.items() if not k.startswith("_")}
        (Path(tmp) / "config.json").write_text(json.dumps({**cfg, "_class_name": "WanTransformer3DModel"}))
        try:
            model = WanTransformer3DModel.from_single_file(
                str(path), config=tmp, quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
                torch_dtype=dtype, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - a broken or foreign file becomes one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise CliploomError(f"{where}: cannot load GGUF DiT {path.name}: {first}",
                                "check that it is a Wan DiT quantisation of this family") from None
    model._cliploom_weights = "gguf"
    model._cliploom_compute_dtype = dtype
    return model.eval().requires_grad_(False)


def _empty_model(cls, config: dict):
    from accelerate import init_empty_weights

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        with init_empty_weights():
            return cls.from_config(config)
    except Exception as e:  # noqa: BLE001
        raise CliploomError(f"cannot build a {cls.__name__} from the family config: {e}", "fix the family JSON") from None


def _fill(model, state: dict[str, torch.Tensor], where: str, family: dict, hint_signature: bool) -> None:
    """Put ``state`` into an empty ``model``: every weight present, no extra, every shape right."""
    _fill_check(model, state, where, family, hint_signature)
    model.load_state_dict(state, strict=True, assign=True)


def _fill_check(model, state: dict[str, torch.Tensor], where: str, family: dict, hint_signature: bool = True) -> None:
    """Every weight of ``model`` in ``state``, none extra, every shape right (a one-line error otherwise)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if hint_signature:
        wrong = formats.signature_mismatches(formats.dit_signature(shapes), formats.config_signature(family["transformer"]))
        if wrong:
            fits = matching_families(formats.dit_signature(shapes))
            raise CliploomError(
                f"{where} does not fit family {family['name']}: {', '.join(wrong)}",
                f"use --family {' or '.join(fits)}" if fits else "run `cliploom inspect` on it to see what it is",
            )
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing:
        raise CliploomError(
            f"{where} lacks {len(missing)} weight(s) of family {family['name']}, e.g. {', '.join(missing[:3])}",
            "the checkpoint is incomplete (a missing shard?) or of another model",
        )
    if extra:
        raise CliploomError(
            f"{where} has {len(extra)} weight(s) family {family['name']} has no place for, e.g. {', '.join(extra[:3])}",
            "it is another Wan variant: `cliploom inspect` it and pick the family that fits",
        )
    for k, shape in shapes.items():
        if shape != expected[k]:
            raise CliploomError(
                f"{where}: {k} has shape {shape} but family {family['name']} expects {expected[k]}",
                "the file is of another model size: `cliploom inspect` it",
            )


def load_original_transformer(files: list[Path], layout: str, family: dict, dtype: torch.dtype, where: str,
                              device: torch.device | str = "cpu"):
    """A ``WanTransformer3DModel`` from original/ComfyUI/diffusers-named safetensors shards.

    Tensors are read one at a time and placed on ``device`` directly (host memory holds one
    tensor, not the checkpoint). fp8 weights (with ComfyUI per-tensor scales or without) are
    upcast to ``dtype``; parameters diffusers keeps in float32 (norms, modulation tables, time
    embedding) stay float32, as when diffusers loads a folder.
    """
    from diffusers import WanTransformer3DModel

    model = _empty_model(WanTransformer3DModel, family["transformer"])
    keep = set(model._keep_in_fp32_modules or []) if dtype in (torch.float16, torch.bfloat16) else set()
    state: dict[str, torch.Tensor] = {}
    stored = set()
    for f in files:
        stored |= set(formats.read_header(f).dtypes.values())
        for name, t in formats.stream_dit(f, layout, dtype, lambda k: bool(keep & set(k.split("."))), device):
            state[name] = t
    if any(s.startswith("float8") for s in stored):
        log.info("%s: fp8 weights upcast to %s", where, str(dtype).replace("torch.", ""))
    _fill(model, state, where, family, hint_signature=True)
    return model


def load_original_vae(path: Path, layout: str, family: dict, where: str):
    from diffusers import AutoencoderKLWan

    if layout == "folder":
        return _load(AutoencoderKLWan, path.parent, path.name, torch_dtype=torch.float32)
    model = _empty_model(AutoencoderKLWan, family["vae"])
    raw = formats.load_tensors(path, "VAE")
    formats.check_finite(raw, f"VAE {path}")
    state = formats.dequantize(formats.vae_to_diffusers(raw, layout), torch.float32, f"VAE {path}")
    _fill(model, state, f"{where}: VAE {path.name}", family, hint_signature=False)
    return model


# -- diffusers folders ---------------------------------------------------------------------------


def check_model_folder(path: Path) -> dict:
    """Validate that ``path`` looks like a diffusers Wan image-to-video folder; return model_index."""
    if not path.exists():
        raise CliploomError(f"model folder {path} does not exist", "pass --model DIR of a diffusers-layout Wan model")
    if not path.is_dir():
        raise CliploomError(
            f"model {path} is a file, not a folder",
            f"original-format checkpoints need --family ({', '.join(family_names())}); see docs/formats.md",
        )
    index_path = path / "model_index.json"
    if not index_path.is_file():
        if any(path.glob("*.safetensors")) or (path / "high_noise_model").is_dir():
            raise CliploomError(
                f"{path} is not a diffusers model folder (no model_index.json)",
                f"for original Wan / ComfyUI files pass --family ({', '.join(family_names())}); see docs/formats.md",
            )
        raise CliploomError(
            f"{path} is not a diffusers model folder (no model_index.json)",
            "pass a folder such as Wan2.1-I2V-14B-480P-Diffusers or one made by `cliploom make-tiny`",
        )
    index = read_json(index_path, "model index")
    cls = str(index.get("_class_name", ""))
    if not cls.startswith(("Wan", "SkyReelsV2", "Helios")):  # SkyReels-V2, Helios: Wan DiTs (docs/routes.md)
        raise CliploomError(f"{path} holds a {cls or 'unknown'} model, not a Wan model", "pass a Wan I2V model folder")
    for name, entry in index.items():
        if name.startswith("_") or name in ("boundary_ratio", "expand_timesteps"):
            continue
        if isinstance(entry, (bool, int, float)):  # the pipeline's own config (HeliosPyramidPipeline's is_distilled)
            continue
        if entry is not None and (not isinstance(entry, list) or len(entry) != 2
                                  or not all(e is None or isinstance(e, str) for e in entry)):
            raise CliploomError(f"model index {index_path}: {name} must be [library, class], got {str(entry)[:60]}",
                                "check that the model folder is complete")
    missing = [name for name in REQUIRED if not (path / name).is_dir()]
    if missing:
        raise CliploomError(f"model folder {path} lacks {', '.join(missing)}/", "copy the complete model folder")
    return index


def check_diffusers_folder(path: Path) -> tuple[dict, ModelSettings]:
    """Everything about a diffusers folder that can be checked without loading a weight: the
    index, every component's config and weight headers, and the settings (``cliploom inspect``)."""
    index = check_model_folder(path)
    scheduler_config = {}
    if (path / "scheduler" / "scheduler_config.json").is_file():
        scheduler_config = read_json(path / "scheduler" / "scheduler_config.json", "scheduler config")
    settings = ModelSettings.from_folder(path, index, scheduler_config)
    settings = _route_settings(path, index, settings)
    for name in WEIGHTED:
        if (index.get(name) or [None])[0] is None or not (path / name).is_dir():
            continue
        config = read_json(path / name / "config.json", f"{name} config")
        if name == "vae":
            for key in ("z_dim", "base_dim", "num_res_blocks"):
                value = config.get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096):
                    raise CliploomError(f"vae config {path / 'vae' / 'config.json'}: {key} {str(value)[:40]} is not a size",
                                        "check that the model folder is complete")
        if name.startswith("transformer"):
            check_transformer_config(path / name)
        check_weights(path / name)
    return index, settings


SELF_FORCING_SCHEDULER = "SelfForcingFlowMatchScheduler"  # FastVideo's Self-Forcing checkpoints
SELF_FORCING_TIMESTEPS = (1000, 750, 500, 250)  # Self-Forcing's denoising_step_list, warped by the shift
HELIOS_SCHEDULERS = ("HeliosScheduler", "HeliosDMDScheduler")  # a Helios folder's pyramid (stages) scheduler


def _route_settings(path: Path, index: dict, settings: ModelSettings) -> ModelSettings:
    """Folders whose DiT is another route's own (docs/routes.md): no route LoRA is needed there.

    * SkyReels-V2 diffusion forcing (a ``SkyReelsV2DiffusionForcing*Pipeline`` folder; SkyReels' plain
      T2V / I2V folders share the transformer class but not the training, so they stay ``svi``): ``df``;
    * Helios (``HeliosTransformer3DModel``): ``helios``, and only it (the DiT takes history, not ``y``);
    * a causal Wan DiT in FastVideo's diffusers layout (``CausalWanTransformer3DModel``: Wan's keys
      and shapes; Self-Forcing's ``SelfForcingFlowMatchScheduler`` beside it): the causal routes,
      ``self-forcing`` first for a Self-Forcing checkpoint.

    These DiTs are text-to-video (no ``y`` channels): the reference image and the motion latents
    enter as clean prefix frames (``expand_timesteps``), on the causal routes as the first cached
    block -- how SkyReels extends a video and CausVid / Self-Forcing start from an image."""
    import dataclasses

    from . import skyreels

    cls = skyreels.transformer_class_of(path / "transformer") or ""

    def own_settings() -> dict:  # what the folder's cliploom.json sets (for the defaults it overrides)
        return read_settings(path / SETTINGS_FILE) if (path / SETTINGS_FILE).is_file() else {}

    scheduler = ""
    if (path / "scheduler" / "scheduler_config.json").is_file():
        scheduler = str(read_json(path / "scheduler" / "scheduler_config.json", "scheduler config").get("_class_name", ""))
    if cls == skyreels.TRANSFORMER_CLASS and str(index.get("_class_name", "")).startswith("SkyReelsV2DiffusionForcing"):
        routes = ("df",)
    elif cls == "HeliosTransformer3DModel":
        routes = ("helios",)
        sched = read_json(path / "scheduler" / "scheduler_config.json", "scheduler config") \
            if scheduler in HELIOS_SCHEDULERS else None
        # HeliosScheduler's Euler or UniPC (diffusers' default: UniPC); the DMD one has no solver to name
        solver = sched.get("scheduler_type", "unipc") if (sched or {}).get("_class_name") == "HeliosScheduler" else None
        settings = dataclasses.replace(
            settings, helios_scheduler=sched, cfg_zero_star=bool(index.get("is_cfg_zero_star", False)),
            # its pipeline samples with the scheduler's own solver, unless cliploom.json says otherwise
            sampler=settings.sampler or (solver if solver in ("euler", "unipc") else None))
        if index.get("is_distilled") and sched is not None:  # a DMD student (Helios-Distilled): no guidance, few steps
            given = own_settings()
            settings = dataclasses.replace(
                settings, guidance=settings.guidance if "guidance" in given else 1.0,
                guidance_low=settings.guidance_low if "guidance" in given or "guidance_low" in given else None,
                steps=settings.steps if "steps" in given else 2 * int(sched.get("stages", 3)))
    elif scheduler == SELF_FORCING_SCHEDULER:
        routes = ("self-forcing", "causal")
        # its DMD student samples as Self-Forcing trained it: x0 + fresh noise, on its warped 4-step
        # list -- unless the folder's cliploom.json says otherwise (a sampler, steps or timesteps)
        given = own_settings()
        settings = dataclasses.replace(
            settings, sampler=settings.sampler or "renoise",
            timesteps=settings.timesteps if ("steps" in given or "timesteps" in given) else list(SELF_FORCING_TIMESTEPS))
    elif "causal" in cls.lower():
        routes = ("causal", "self-forcing")
    else:
        return settings
    config = read_json(path / "transformer" / "config.json", "transformer config")
    z = read_json(path / "vae" / "config.json", "vae config").get("z_dim", 16) if (path / "vae").is_dir() else 16
    return dataclasses.replace(settings, native_routes=routes,
                               expand_timesteps=settings.expand_timesteps or config.get("in_channels") == z)


def _original_route_settings(family: dict, files: "OriginalFiles", settings: ModelSettings) -> ModelSettings:
    """Original-layout DiTs of another route: the family's ``routes``, or the route ``cliploom convert``
    tagged the DiT with (``cliploom_route``: a Self-Forcing / CausVid / LongLive checkpoint). Such a
    DiT without ``y`` channels takes the image as a clean prefix (``expand_timesteps``), as for
    folders (:func:`_route_settings`)."""
    import dataclasses

    from ..routes import CAUSAL_ROUTES, ROUTES

    routes = tuple(family.get("routes") or ())
    if not routes:
        tags = {formats.read_header(f).metadata.get("cliploom_route") for shards in files.experts for f in shards
                if f.suffix == ".safetensors"}
        if tags & set(CAUSAL_ROUTES):
            routes = ("causal", "self-forcing")
    if not routes:
        return settings
    unknown = [r for r in routes if r not in ROUTES]
    if unknown:
        raise CliploomError(f"family {family['name']}: unknown routes {unknown}", f"use routes of {', '.join(ROUTES)}")
    t2v = family["transformer"].get("in_channels") == family["vae"].get("z_dim", 16)
    return dataclasses.replace(settings, native_routes=routes, expand_timesteps=settings.expand_timesteps or t2v)


def check_transformer_config(folder: Path) -> None:
    """Before a model is built from ``config.json``: its sizes are numbers in range, and the model
    they describe is no larger than the weights stored beside it (a config that lies would build
    a model of any size before the weights are even read)."""
    config = read_json(folder / "config.json", "transformer config")
    for key in ("num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim", "in_channels", "out_channels",
                "text_dim", "freq_dim"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**20):
            raise CliploomError(f"transformer config {folder / 'config.json'}: {key} {str(value)[:40]} is not a size",
                                "check that the model folder is complete")
    layers = config.get("num_layers") or 0
    if layers > formats.MAX_BLOCKS:
        raise CliploomError(f"transformer config {folder / 'config.json'}: num_layers {layers} is more than "
                            f"{formats.MAX_BLOCKS}", "check that the model folder is complete")
    described = formats.estimate_dit_params(config)
    stored = formats.stored_elements(sorted(folder.glob("*.safetensors")))
    if stored and described > 1.05 * stored:
        raise CliploomError(
            f"transformer config {folder / 'config.json'} describes about {described / 1e6:.1f} M parameters but the "
            f"weights beside it hold {stored / 1e6:.1f} M", "the config does not belong to these weights")


def load_model(
    path: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    family: str | os.PathLike | None = None,
    offload: str | None = None,
    weights: str | None = None,
) -> Components:
    """Load a Wan image-to-video model (Wan 2.1 I2V, Wan 2.2 A14B, Wan 2.2 TI2V).

    ``path=None`` or ``"builtin"`` loads the built-in model. Without ``family``, ``path`` is a
    diffusers folder; with it, a folder (or DiT file) of original Wan / ComfyUI files, read with
    the family's config (a shipped name such as ``wan21-i2v-14b-480p``, or a JSON file). The
    transformer(s) take ``dtype`` (bfloat16 on CUDA, float32 on CPU by default); the VAE stays in
    float32. With ``offload`` (model, group, sequential) the weights stay in host memory until the
    memory options put their hooks in place, so a model larger than the GPU can load.
    ``weights`` (bf16, fp16, fp32, fp8) sets how the transformer weights are stored; fp8 keeps
    them in float8 with a per-tensor scale and computes in ``dtype`` (models.precision).
    """
    from .builtin import resolve_model_path

    if family is not None and (path is None or str(path) == "builtin"):
        raise CliploomError("--family needs --model: the folder (or DiT file) of original-format weights",
                            "pass --model PATH, or drop --family for the built-in model")
    path = resolve_model_path(path)
    device = torch.device(device) if device is not None else default_device()
    storage = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if weights is not None and weights not in (*storage, "fp8"):
        raise CliploomError(f"unknown weights {weights!r}", "use bf16, fp16, fp32 or fp8")
    dtype = dtype or storage.get(weights) or default_dtype(device)
    place = offload in (None, "none")
    fp8 = weights == "fp8"
    with quiet_hf():  # the libraries' loading bars and notes are not for our users
        if family is not None:
            return _load_original(path, load_family(family), device, dtype, place, fp8)
        return _load_diffusers(path, device, dtype, place, fp8)


def _load_diffusers(path: Path, device: torch.device, dtype: torch.dtype, place: bool, fp8: bool = False) -> Components:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    index, settings = check_diffusers_folder(path)

    def dit(name: str):
        from . import skyreels

        own = skyreels.transformer_class_of(path / name)
        if own in (skyreels.TRANSFORMER_CLASS, "HeliosTransformer3DModel"):  # diffusers' own classes for these DiTs
            from diffusers import HeliosTransformer3DModel

            if fp8:
                raise CliploomError(f"{path}: fp8 weights are not available for SkyReels-V2 or Helios models yet",
                                    "drop weights: fp8 (use bf16)")
            cls = skyreels.DiffusionForcingTransformer if own == skyreels.TRANSFORMER_CLASS else HeliosTransformer3DModel
            return _load(cls, path, name, torch_dtype=dtype)
        if not fp8:
            return _load(WanTransformer3DModel, path, name, torch_dtype=dtype)
        from .precision import load_fp8_transformer

        config = read_json(path / name / "config.json", f"{name} config")
        return load_fp8_transformer(check_weights(path / name), "diffusers", config, dtype, f"{path}/{name}",
                                    device if place else "cpu")

    transformer = dit("transformer")
    transformer_2 = None
    if (index.get("transformer_2") or [None])[0] is not None and (path / "transformer_2").is_dir():
        transformer_2 = dit("transformer_2")
    vae = _load(AutoencoderKLWan, path, "vae", torch_dtype=torch.float32)
    text_encoder = _load(UMT5EncoderModel, path, "text_encoder", torch_dtype=dtype)
    tokenizer = _load(AutoTokenizer, path, "tokenizer")
    image_encoder = image_processor = None
    if (index.get("image_encoder") or [None])[0] is not None and (path / "image_encoder").is_dir():
        from transformers import CLIPVisionModel

        image_encoder = _load(CLIPVisionModel, path, "image_encoder", torch_dtype=torch.float32)
        image_processor = _load(clip_image_processor(), path, "image_processor")
    model = _assemble(path, settings, device, dtype, transformer, transformer_2, vae, text_encoder, tokenizer,
                      image_encoder, image_processor, place)
    for name, module in (("transformer", transformer), ("transformer_2", transformer_2)):
        if module is not None:  # on the device: fast on a GPU
            formats.check_finite(dict(module.state_dict()), f"{path}/{name}")
    return model


def _load_original(model: Path, family: dict, device: torch.device, dtype: torch.dtype, place: bool,
                   fp8: bool = False) -> Components:
    from transformers import AutoTokenizer, UMT5EncoderModel

    if (model / "model_index.json").is_file():
        raise CliploomError(f"{model} is a diffusers folder; --family is for original Wan / ComfyUI files",
                            "drop --family: the folder's own configs are used")
    files = find_original_files(model, family)
    folder = files.folder
    experts = []
    for i, (shards, layout) in enumerate(zip(files.experts, files.dit_layouts)):
        what = f"model {model}" + ("" if len(files.experts) == 1 else f" ({('high', 'low')[i]}-noise expert)")
        if layout == "gguf":
            if fp8:
                raise CliploomError(f"{what}: a GGUF DiT is already quantised", "drop --weights fp8")
            experts.append(load_gguf_transformer(shards[0], family["transformer"], dtype, what))
        elif fp8:
            from .precision import load_fp8_transformer

            experts.append(load_fp8_transformer(
                shards, layout, family["transformer"], dtype, what, device if place else "cpu",
                check=lambda m, state, what=what: _fill_check(m, state, what, family)))
        else:
            experts.append(load_original_transformer(shards, layout, family, dtype, what, device if place else "cpu"))
    vae = load_original_vae(files.vae, files.vae_layout, family, f"model {model}")
    text_encoder = _load(UMT5EncoderModel, folder, files.text_encoder.name, torch_dtype=dtype)
    tokenizer = _load(AutoTokenizer, files.tokenizer.parent, files.tokenizer.name)
    image_encoder = image_processor = None
    if files.image_encoder is not None:
        from transformers import CLIPVisionModel

        image_encoder = _load(CLIPVisionModel, folder, files.image_encoder.name, torch_dtype=torch.float32)
        image_processor = _load(clip_image_processor(), folder, files.image_processor.name)
    settings = _original_route_settings(family, files, family_settings(family, folder))
    return _assemble(folder, settings, device, dtype, experts[0], experts[1] if len(experts) > 1 else None, vae,
                     text_encoder, tokenizer, image_encoder, image_processor, place)


def _assemble(path, settings, device, dtype, transformer, transformer_2, vae, text_encoder, tokenizer,
              image_encoder, image_processor, place: bool = True) -> Components:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    check_image_to_video(path, transformer, vae, settings)
    if settings.boundary_ratio is not None and transformer_2 is None:
        raise CliploomError(
            f"{path} sets boundary_ratio but has no transformer_2/", "copy the low-noise expert into transformer_2/"
        )
    if image_encoder is not None and settings.max_sequence_length != 512:
        raise CliploomError(
            f"{path} has an image encoder but max_sequence_length {settings.max_sequence_length}",
            "Wan's attention splits image and text tokens assuming 512 text tokens: set it to 512 in cliploom.json",
        )

    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=settings.shift),
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=settings.boundary_ratio,
        expand_timesteps=settings.expand_timesteps,
    )
    if place:
        pipe.to(device)
    for module in (transformer, transformer_2, vae, text_encoder, image_encoder):
        if module is not None:
            module.eval().requires_grad_(False)
    model = Components(pipe=pipe, settings=settings, path=path, device=device, dtype=dtype)
    model._cliploom_placed = place  # False: in host memory until memory options place it
    return model


def check_image_to_video(path: Path, transformer, vae, settings: ModelSettings) -> None:
    """Refuse text-to-video and mismatched models with a clear message."""
    z = vae.config.z_dim
    cin = transformer.config.in_channels
    if settings.expand_timesteps:
        if cin != z:
            raise CliploomError(
                f"{path}: TI2V transformer takes {cin} channels but the VAE makes {z}", "pair it with its own VAE"
            )
        return
    if cin == z:
        raise CliploomError(
            f"{path} is a text-to-video Wan model ({cin} input channels)",
            "cliploom needs an image-to-video model (Wan2.1-I2V, Wan2.2-I2V-A14B or Wan2.2-TI2V-5B)",
        )
    if cin != 2 * z + 4:
        raise CliploomError(
            f"{path}: transformer takes {cin} channels, an I2V model with a z{z} VAE needs {2 * z + 4}",
            "pair the transformer with its own VAE",
        )
