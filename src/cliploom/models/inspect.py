"""``cliploom inspect FILE|DIR``: what a weight file (or a folder of them) is, from its header.

    cliploom inspect svi_v2_pro_high.safetensors     # LoRA: layout, rank, alpha, modules, expert, family
    cliploom inspect Wan2.1-I2V-14B-480P/            # original files: which family, how to load them
    cliploom inspect model-Diffusers/ --json

Base checkpoints are described from the safetensors header alone (no tensor is read); LoRA files
are read whole (they are small) so that alphas are known and NaN/Inf is caught.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from ..errors import CliploomError
from . import formats

KIND_NAMES = {"lora": "LoRA", "dit": "DiT (base transformer)", "vae": "VAE", "text_encoder": "text encoder",
              "image_encoder": "image encoder", "empty": "empty file", "unknown": "unknown weights"}
DIT_LAYOUTS = {"wan": "original Wan (blocks.N.self_attn.q.weight, head.modulation)",
               "comfy": "ComfyUI (model.diffusion_model. + original Wan names)",
               "diffusers": "diffusers (blocks.N.attn1.to_q.weight, scale_shift_table)"}
VAE_LAYOUTS = {"wan21": "original Wan 2.1 VAE (z16)", "wan22": "original Wan 2.2 VAE (z48, residual)",
               "diffusers": "diffusers AutoencoderKLWan"}


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@functools.lru_cache(maxsize=1)
def _families():
    from .loading import family_names, load_family

    return {name: load_family(name) for name in family_names()}


# -- files ---------------------------------------------------------------------------------------


def lora_signature(lora: formats.LoraFile) -> dict:
    """What a LoRA's shapes say about the model it is for: width, FFN width, blocks, image attention."""
    def shape(name, which, axis):
        m = lora.modules.get(name)
        t = getattr(m, which, None) if m is not None else None
        return int(t.shape[axis]) if t is not None else None

    dim = ffn = None
    for name, m in lora.modules.items():
        if m.down is None:
            continue
        if re.match(r"blocks\.\d+\.attn[12]\.to_(q|k|v|out\.0)$", name):
            dim = dim or int(m.down.shape[1])
        if re.match(r"blocks\.\d+\.ffn\.net\.0\.proj$", name):
            ffn = ffn or int(m.up.shape[0])
            dim = dim or int(m.down.shape[1])
    blocks = [int(m.group(1)) for n in lora.modules if (m := re.match(r"blocks\.(\d+)\.", n))]
    return {
        "dim": dim,
        "ffn_dim": ffn,
        "min_layers": max(blocks) + 1 if blocks else None,
        "image_attention": any(".attn2.add_k_proj" in n or ".attn2.add_v_proj" in n for n in lora.modules),
        "patch_in": shape("patch_embedding", "down", 1),
    }


def lora_families(sig: dict) -> list[str]:
    out = []
    for name, fam in _families().items():
        t = fam["transformer"]
        if sig["dim"] is not None and sig["dim"] != t["num_attention_heads"] * t["attention_head_dim"]:
            continue
        if sig["ffn_dim"] is not None and sig["ffn_dim"] != t["ffn_dim"]:
            continue
        if sig["min_layers"] is not None and sig["min_layers"] > t["num_layers"]:
            continue
        if sig["image_attention"] and t.get("image_dim") is None:
            continue
        if sig["patch_in"] is not None and sig["patch_in"] != t["in_channels"]:
            continue
        out.append(name)
    return out


def describe_lora(path: Path, header: formats.Header) -> dict:
    lora = formats.read_lora(path)
    names = sorted(lora.modules)
    pairs = sorted(lora.pairs())
    deltas = sorted(lora.deltas())
    sig = lora_signature(lora)
    expert = formats.expert_from_name(path)
    meta_text = " ".join(str(v) for v in header.metadata.values()).lower()
    if expert is None and ("high_noise" in meta_text) != ("low_noise" in meta_text):
        expert = "high" if "high_noise" in meta_text else "low"
        expert_from = "metadata"
    else:
        expert_from = "name" if expert else None
    scales = sorted({round(m.scale, 6) for m in lora.pairs().values()})
    return {
        "kind": "lora",
        "layout": lora.layout,
        "layout_name": formats.LORA_LAYOUTS[lora.layout],
        "ranks": lora.ranks,
        "alphas": lora.alphas,
        "scales": scales,
        "modules": len(names),
        "pairs": len(pairs),
        "deltas": len(deltas),
        "targets": formats.summarise_modules(
            formats.diffusers_module_to_original(n, max(lora.num_blocks, 1)) for n in names),
        "not_applied": {k: lora.ignored[k] for k in sorted(lora.ignored)},
        "expert": expert,
        "expert_from": expert_from,
        "families": lora_families(sig),
        "signature": sig,
        "route": header.metadata.get("cliploom_route") or "svi",  # train-svi tags the route it trained for
    }


def describe_dit(header: formats.Header, layout: str, path: Path) -> dict:
    keys = header.keys
    if layout == "diffusers":
        shapes = dict(header.shapes)
    else:
        shapes = _diffusers_shapes(header, layout)
    sig = formats.dit_signature(shapes)
    blocks = sig["num_layers"] or 0
    complete = (
        "patch_embedding.weight" in shapes and "proj_out.weight" in shapes
        and all(f"blocks.{i}.attn1.to_q.weight" in shapes for i in range(blocks))
        and not re.search(r"-\d+-of-\d+\.safetensors$", path.name)
    )
    families = []
    if complete:
        from .loading import matching_families

        families = matching_families(sig)
    params = sum(_numel(header.shapes[k]) for k in keys)
    return {
        "kind": "dit",
        "layout": layout,
        "layout_name": DIT_LAYOUTS[layout],
        "complete": complete,
        "parameters": params,
        "signature": sig,
        "families": families,
        "expert": formats.expert_from_name(path),
        "fp8_scaled": any(k.endswith(formats._SCALE_SUFFIXES) for k in keys),
        "route": header.metadata.get("cliploom_route") or "svi",  # `cliploom convert` tags causal checkpoints
    }


def _diffusers_shapes(header: formats.Header, layout: str) -> dict[str, tuple[int, ...]]:
    """A DiT header's weight shapes under diffusers names (quantisation scales left out)."""
    bare = {}
    for k in header.keys:
        if k.endswith(formats._SCALE_SUFFIXES) or k == "scaled_fp8":
            continue
        prefix = next((p for p in formats._DIT_PREFIXES if k.startswith(p)), "")
        bare[k[len(prefix):]] = k
    if layout == "diffusers":
        return {b: header.shapes[k] for b, k in bare.items()}
    renamed = formats.rename_original(list(bare))
    return {renamed[b]: header.shapes[k] for b, k in bare.items()}


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def describe_vae(header: formats.Header, layout: str) -> dict:
    _, bare = formats._strip_keys(header.keys, formats._VAE_PREFIXES)
    prefix = next((p for p in formats._VAE_PREFIXES if any(k.startswith(p) for k in header.keys)), "")
    z = None
    for key in ("conv2.weight", "post_quant_conv.weight"):
        if key in bare:
            z = header.shapes[prefix + key][0]
    families = []
    for name, fam in _families().items():
        wanted = "wan22" if fam["vae"].get("is_residual") else "wan21"
        if layout in (wanted,) or (layout == "diffusers" and z == fam["vae"]["z_dim"]):
            families.append(name)
    return {"kind": "vae", "layout": layout, "layout_name": VAE_LAYOUTS[layout], "z_dim": z, "families": families}


def describe_file(path: str | Path) -> dict:
    path = Path(path).expanduser()
    header = formats.read_header(path, "file")
    what = formats.classify(header)
    dtypes = sorted({header.dtypes[k] for k in header.keys})
    base = {"path": str(path), "size": header.size, "tensors": len(header.keys), "dtypes": dtypes}
    if what["kind"] == "lora":
        return {**base, **describe_lora(path, header)}
    if what["kind"] == "dit":
        return {**base, **describe_dit(header, what["layout"], path)}
    if what["kind"] == "vae":
        return {**base, **describe_vae(header, what["layout"])}
    return {**base, "kind": what["kind"], "layout": what["layout"], "example_keys": header.keys[:3]}


# -- folders -------------------------------------------------------------------------------------


def describe_dir(path: str | Path) -> dict:
    from .loading import check_diffusers_folder, find_original_files, matching_families, read_json

    path = Path(path).expanduser()
    out: dict = {"path": str(path), "kind": "folder"}
    if (path / "model_index.json").exists():
        index, settings = check_diffusers_folder(path)  # what would stop it loading, named now
        out["kind"] = "diffusers"
        out["class"] = index.get("_class_name")
        # the route the folder's own DiT is for (its transformer config and scheduler), else its class's
        out["route"] = (settings.native_routes or (None,))[0] or route_of_class(
            (index.get("transformer") or [None, ""])[1] or "")
        experts = [n for n in ("transformer", "transformer_2") if (index.get(n) or [None])[0]]
        out["experts"] = len(experts)
        families = None
        for name in experts:
            cfg_path = path / name / "config.json"
            if cfg_path.is_file():
                sig = formats.config_signature(read_json(cfg_path, "transformer config"))
                fits = [f for f in matching_families(sig) if len(experts) == _families()[f]["experts"]]
                families = fits if families is None else [f for f in families if f in fits]
        out["families"] = families or []
        out["components"] = sorted(k for k, v in index.items() if isinstance(v, list) and v[0] is not None)
        out["load"] = f"--model {path}"
        return out
    files = []
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*_noise_model/*.safetensors")):
        try:
            d = describe_file(f)
        except CliploomError as e:
            d = {"path": str(f), "kind": "error", "error": str(e)}
        files.append({**d, "name": str(f.relative_to(path))})
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".pth", ".pt", ".ckpt", ".bin", ".pkl"))
    if not files and not pickles:
        raise CliploomError(f"{path} holds no model files (no model_index.json, no .safetensors)",
                            "pass a model folder or a .safetensors file")
    out["files"] = files
    out["pickles"] = pickles
    dit_paths = [Path(f["path"]) for f in files if f["kind"] == "dit"]
    if dit_paths:
        # The experts share one architecture: the union of all DiT files' shapes is its signature.
        sig = _merged_signature(dit_paths)
        out["signature"] = sig
        two = any(formats.expert_from_name(p) for p in dit_paths)
        fits = [name for name in matching_families(sig) if (_families()[name]["experts"] == 2) == two]
        loadable, problems = [], {}
        for name in fits:
            try:
                find_original_files(path, _families()[name])
                loadable.append(name)
            except CliploomError as e:
                problems[name] = str(e)
        out["families"] = loadable
        out["problems"] = problems
        if loadable:
            out["load"] = f"--model {path} --family {loadable[0]}"
        elif not fits:
            out["problems"] = {"any shipped family": f"no shipped family has {sig['num_layers']} blocks of width "
                               f"{sig['dim']} (ffn {sig['ffn_dim']}, in_channels {sig['in_channels']}); "
                               "write a family JSON for it (see docs/formats.md)"}
    return out


ROUTE_CLASSES = {"SkyReelsV2Transformer3DModel": "df", "HeliosTransformer3DModel": "helios"}


def route_of_class(name: str) -> str:
    """The long-video route a diffusers transformer class is made for (docs/routes.md)."""
    if name in ROUTE_CLASSES:
        return ROUTE_CLASSES[name]
    return "causal" if "causal" in name.lower() else "svi"


def _merged_signature(files) -> dict:
    shapes = {}
    for f in files:
        header = formats.read_header(f)
        shapes.update(_diffusers_shapes(header, formats.detect_dit_layout(header.keys)))
    return formats.dit_signature(shapes)


def inspect_path(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if not path.exists():
        raise CliploomError(f"{path} does not exist", "check the path")
    return describe_dir(path) if path.is_dir() else describe_file(path)


# -- text ----------------------------------------------------------------------------------------


def format_file(d: dict, indent: str = "") -> list[str]:
    name = d.get("name") or Path(d["path"]).name
    if d["kind"] == "error":
        return [f"{indent}{name}: {d['error']}"]
    head = f"{indent}{name}: {KIND_NAMES.get(d['kind'], d['kind'])}"
    if d.get("layout_name"):
        head += f", {d['layout_name']}"
    lines = [head, f"{indent}  size {human_size(d['size'])}, {d['tensors']} tensors, dtype {'/'.join(d['dtypes'])}"]
    fams = d.get("families")
    if d["kind"] == "lora":
        alphas = "/".join(f"{a:g}" for a in d["alphas"]) or "none (scale 1)"
        scales = "/".join(f"{s:g}" for s in d["scales"])
        lines.append(f"{indent}  rank {'/'.join(map(str, d['ranks'])) or '-'}, alpha {alphas}, scale {scales or '-'}")
        lines.append(f"{indent}  {d['modules']} modules ({d['pairs']} low-rank pairs, {d['deltas']} full deltas):")
        lines += [f"{indent}    {t}" for t in d["targets"]]
        if d["not_applied"]:
            keys = list(d["not_applied"])
            lines.append(f"{indent}  not applied: {len(keys)} key(s), e.g. {keys[0]} ({d['not_applied'][keys[0]]})")
        expert = f"{d['expert']} (from the {d['expert_from']})" if d["expert"] else "not stated (applies to both)"
        lines.append(f"{indent}  expert: {expert}")
        if d.get("route", "svi") != "svi":
            lines.append(f"{indent}  route: {d['route']} (its loop only: route: {d['route']} in the story, docs/routes.md)")
    elif d["kind"] == "dit":
        s = d["signature"]
        shown = [f"{s['num_layers']} blocks"] + [f"{label} {s[key]}" for key, label in
                                                  (("dim", "width"), ("ffn_dim", "ffn"), ("in_channels", "in_channels"))
                                                  if s[key] is not None]
        if d["complete"]:
            shown.append(f"image attention {'yes' if s['has_image'] else 'no'}")
        lines.append(f"{indent}  {_count(d['parameters'])} parameters; {', '.join(shown)}")
        if d["fp8_scaled"]:
            lines.append(f"{indent}  fp8 with per-tensor scales (ComfyUI scaled): upcast on load")
        elif any(t.startswith("float8") for t in d["dtypes"]):
            lines.append(f"{indent}  fp8: upcast on load")
        if not d["complete"]:
            lines.append(f"{indent}  a shard (or part) of a checkpoint: inspect its folder to see the whole model")
        if d["expert"]:
            lines.append(f"{indent}  expert: {d['expert']}-noise (from the name)")
        if d.get("route", "svi") != "svi":
            lines.append(f"{indent}  route: {d['route']} (docs/routes.md)")
    elif d["kind"] == "vae":
        lines.append(f"{indent}  z_dim {d['z_dim']}")
    elif d.get("example_keys"):
        lines.append(f"{indent}  keys such as {', '.join(d['example_keys'])}")
    if fams is not None and d["kind"] in ("lora", "dit", "vae") and (d["kind"] != "dit" or d["complete"]):
        lines.append(f"{indent}  fits: {', '.join(fams) if fams else 'no shipped family'}")
    return lines


def format_report(d: dict) -> str:
    if d["kind"] == "diffusers":
        lines = [f"{d['path']}: diffusers {d['class']} folder, {d['experts']} transformer(s)",
                 f"  components: {', '.join(d['components'])}",
                 f"  fits: {', '.join(d['families']) or 'no shipped family'}",
                 f"  load with: {d['load']}"]
        if d.get("route", "svi") != "svi":
            lines.insert(1, f"  route: {d['route']} (docs/routes.md)")
        return "\n".join(lines)
    if d["kind"] != "folder":
        return "\n".join(format_file(d))
    lines = [f"{d['path']}: folder of {len(d['files'])} safetensors file(s)"]
    for f in d["files"]:
        lines += format_file(f, "  ")
    if d["pickles"]:
        lines.append(f"  pickles (never loaded; `cliploom convert` turns a causal checkpoint into safetensors): "
                     f"{', '.join(d['pickles'])}")
    if d.get("families"):
        lines.append(f"  fits: {', '.join(d['families'])}")
    if "load" in d:
        lines.append(f"  load with: {d['load']}")
    for name, problem in (d.get("problems") or {}).items():
        lines.append(f"  not loadable as {name}: {problem}")
    return "\n".join(lines)


def add_command(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="say what a weight file or folder is: base or LoRA, layout, family, rank, alpha, expert",
        description="Describe a safetensors file (base DiT, VAE, LoRA, encoder) or a model folder: layout, the "
        "model family it fits, rank/alpha and targeted modules of LoRAs, expert, dtype, size. See docs/formats.md.",
    )
    p.add_argument("path", help="a .safetensors file, a diffusers model folder or a folder of original files")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    result = inspect_path(args.path)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0
