"""LoRA stacks: several LoRAs, each with a weight and a target expert, applied through peft.

Every file is first normalised by :func:`formats.read_lora` (SVI 1.0 / 2.0, diffusers/peft,
ComfyUI/LightX2V, kohya/musubi layouts -> diffusers module names, alpha/rank folded into A).
Low-rank pairs are then loaded as peft adapters with diffusers' ``load_lora_adapter`` (or, in a
fused stack, merged directly, below); full
deltas (ComfyUI ``.diff`` / ``.diff_b``, e.g. norms and biases) are added to the weights
directly, ``weight * delta``.

* **fused** (default): the stack is merged into the weights, so sampling runs at the base
  model's speed; the stack is then permanent for this model. Pairs on plain float layers are
  merged directly, ``W += weight * scale * B @ A`` summed over the stack in float32 and rounded
  once into the weights' dtype (peft's merge without its adapter injection, which is most of the
  cost of applying a LoRA: a cold start's first frames wait for it); layers peft must wrap
  (quantised storage) still go through peft's ``fuse_lora``.
* **unfused**: adapters stay switchable; :meth:`LoraStack.set_clip_weights` changes each LoRA's
  weight per clip (deltas are recomputed from a copy of the touched parameters, never drifted).
  :meth:`LoraStack.merge` merges an unfused stack into float32 weights for as long as its weights
  stay (base speed) and keeps the adapters and a copy of the weights, so the next weight change
  restores them exactly first: a story whose clip 0 turns the SVI LoRA off runs its other clips fused.

Reporting: every LoRA's modules touched per expert are logged and kept in :meth:`summary`; keys
that could not be applied are listed in a warning; a LoRA that matches nothing, a shape that does
not fit, NaN/Inf values are errors.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CliploomError
from . import formats

log = logging.getLogger(__name__)

EXPERT_ATTRS = {"high": ["transformer"], "low": ["transformer_2"], "both": ["transformer", "transformer_2"]}
_SHOW = 6  # module groups listed in a warning before "... and N more"


@dataclass
class _Delta:
    """A full delta added to one parameter: ``param += weight * delta``."""

    param: torch.nn.Parameter  # the parameter itself (peft wrapping renames it, never replaces it)
    delta: torch.Tensor  # float32, on the parameter's device


@dataclass
class _Applied:
    spec: object  # story.LoraSpec
    adapter: str
    layout: str
    ranks: list[int]
    alphas: list[float]
    targets: list[str]
    modules: dict[str, int] = field(default_factory=dict)  # expert attr -> modules touched
    pairs: dict[str, int] = field(default_factory=dict)  # expert attr -> peft adapters injected
    direct: dict[str, int] = field(default_factory=dict)  # expert attr -> pairs merged directly (fused stacks)
    merges: list[tuple[torch.nn.Module, object]] = field(default_factory=list)  # (layer, LoraModule) to merge
    deltas: list[_Delta] = field(default_factory=list)
    n_deltas: int = 0  # parameters changed by full deltas
    unapplied: list[str] = field(default_factory=list)
    weight: float = 1.0  # the weight in force now


def _resolve(transformer, name: str):
    """``("module", base module)`` or ``("param", parameter)`` for a diffusers name, else None."""
    try:
        module = transformer.get_submodule(name)
    except AttributeError:
        module = None
    if module is not None:
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        return "module", base
    try:
        return "param", transformer.get_parameter(name)
    except AttributeError:
        return None


def _set_adapters(transformer, names: list[str], weights: list[float]) -> None:
    transformer.set_adapters(names, weights)
    transformer.requires_grad_(False)  # peft marks active adapters trainable; sampling needs no graph


def _check_range(path: Path, m, name: str, weight: float, dtype: torch.dtype) -> None:
    """The update ``weight * scale * B @ A`` must stay finite in the weights' dtype: its largest
    possible entry is bounded by max|B| * max|A| * rank * |scale * weight| (no product is formed)."""
    bound = float(m.up.abs().max()) * float(m.down.abs().max()) * m.rank * abs(m.scale * weight)
    limit = torch.finfo(dtype).max / 2
    if not bound <= limit:
        raise CliploomError(
            f"LoRA {path}: at weight {weight:g} the update of {name} could reach {bound:.3g}, beyond what "
            f"{str(dtype).replace('torch.', '')} holds ({limit:.3g})", "lower the LoRA weight, or the file is damaged")


@torch.no_grad()
def add_low_rank(weight: torch.Tensor, terms) -> None:
    """``weight += sum(w * B @ A)`` over ``terms`` of ``(w, B [out, r, ...], A [r, in, ...])`` (A with
    its alpha / rank folded in, as peft holds it): summed in float32 on the weight's device, rounded
    once into its dtype, one float32 buffer. The one merge arithmetic of a fused stack and of an
    unfused stack merged for a story's steady clips, so that a run resumed with its stack fused has
    the weights of the uninterrupted run that merged it."""
    delta = torch.zeros(weight.shape[0], weight[0].numel(), dtype=torch.float32, device=weight.device)
    for w, up, down in terms:
        delta.addmm_(up.to(weight.device, torch.float32).flatten(1), down.to(weight.device, torch.float32).flatten(1),
                     alpha=w)
    delta += weight.reshape(delta.shape)
    weight.copy_(delta.view(weight.shape))


def _plain(layer) -> bool:
    """A layer whose weight a fused stack can add to directly: torch's own Linear / Conv, float
    weights (a GGUF or otherwise quantised layer is a subclass, or stores another dtype)."""
    return (type(layer) in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)
            and type(layer.weight) is torch.nn.Parameter
            and layer.weight.dtype in (torch.float32, torch.bfloat16, torch.float16))


def _fit_error(path, key: str, shape, target: str, expected) -> CliploomError:
    return CliploomError(
        f"LoRA {path}: {key} has shape {tuple(shape)} but the model's {target} has shape {tuple(expected)}",
        "the LoRA is for another model size or variant: `cliploom inspect` it",
    )


class LoraStack:
    """The LoRAs applied to a model; re-applying the same stack is free."""

    def __init__(self, model, fuse: bool = True):
        self.model = model
        self.fuse = fuse
        self.fused = False
        self.merged = False  # an unfused stack merged into the weights for now (merge / unmerge)
        self._originals: list[tuple[object, torch.Tensor]] = []  # merged layers and their weights before
        self.applied: list[_Applied] = []
        self._key = None
        self._base: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}  # untouched copies of delta'd params

    # -- building ------------------------------------------------------------------------------
    def apply(self, specs, fuse: bool = True) -> None:
        """Apply ``specs`` (``LoraSpec`` list) to the model, fused or as switchable adapters."""
        specs = list(specs)
        key = ([(str(Path(s.path)), float(s.weight), s.expert, s.name) for s in specs], bool(fuse) and bool(specs))
        if key == self._key or (not specs and not self.applied and not self.fused):
            self._key = key
            return
        if self.fused:
            names = ", ".join(a.spec.name for a in self.applied)
            raise CliploomError(
                f"this engine's weights already have LoRAs fused into them ({names})",
                "load a new Engine for another LoRA stack, or use fuse_loras: false (--no-fuse) to switch stacks",
            )
        if getattr(self.model, "_cliploom_fp8_matmul", False):
            raise CliploomError("this engine's weights are quantised for fp8 matmuls, with the LoRAs it had then",
                                "load a new Engine for another LoRA stack")
        offload = getattr(self.model, "_cliploom_offload", None)
        if offload not in (None, "none"):
            raise CliploomError(
                f"cannot change LoRAs while offload {offload!r} is on", "load a new Engine for another LoRA stack"
            )
        self.clear()
        pipe = self.model.pipe
        try:
            for i, spec in enumerate(specs):
                self.applied.append(self._apply_one(i, spec, direct=bool(fuse)))
            for attr in ("transformer", "transformer_2"):
                adapters = [a for a in self.applied if a.pairs.get(attr)]
                if adapters:
                    _set_adapters(getattr(pipe, attr), [a.adapter for a in adapters], [float(a.spec.weight) for a in adapters])
            for a in self.applied:
                a.weight = float(a.spec.weight)
            self._write_deltas()
            if fuse and self.applied:
                self.fused = True  # from here the weights change for good: a failure leaves them refused, not "clean"
                self._merge_direct()
                for attr in ("transformer", "transformer_2"):
                    adapters = [a.adapter for a in self.applied if a.pairs.get(attr)]
                    module = getattr(pipe, attr)
                    if adapters:
                        module.fuse_lora(adapter_names=adapters)
                        module.unload_lora()
                self._base.clear()
                for a in self.applied:
                    a.deltas = []
                self.fused = True
        except BaseException:
            if not self.fused:
                self.clear()
            raise
        self.fuse = bool(fuse)
        self._key = key
        for a in self.applied:
            log.info("%s", self._line(a))

    def _apply_one(self, i: int, spec, direct: bool = False) -> _Applied:
        """Check one LoRA against the model and load it: its pairs as a peft adapter, or, with
        ``direct`` (a fused stack), kept for :meth:`_merge_direct` where the layer is a plain float one."""
        pipe = self.model.pipe
        path = Path(spec.path).expanduser()
        if spec.expert not in EXPERT_ATTRS:
            raise CliploomError(f"LoRA {path}: unknown expert {spec.expert!r}", "use both, high or low")
        if spec.expert != "both" and pipe.transformer_2 is None:
            raise CliploomError(
                f"LoRA {path} targets the {spec.expert}-noise expert, but model {self.model.path} has one transformer",
                "use expert both: only Wan 2.2 A14B has high/low-noise experts",
            )
        lora = formats.read_lora(path)
        named = formats.expert_from_name(path)
        if spec.expert == "both" and pipe.transformer_2 is not None and named:
            log.warning(
                "LoRA %s: its name says %s-noise expert, but it is applied to both experts; "
                "pass %s:%s:%s to target one", path.name, named, path, spec.weight, named,
            )
        targets = [a for a in EXPERT_ATTRS[spec.expert] if getattr(pipe, a) is not None]
        # The file's tensors are not kept: peft holds the pairs (a fused stack's until it merges them),
        # the deltas are kept below.
        applied = _Applied(spec, f"cliploom_{i}", lora.layout, lora.ranks, lora.alphas, targets, weight=float(spec.weight))
        unmatched: dict[str, str] = {}
        for attr in targets:
            transformer = getattr(pipe, attr)
            pairs, touched = [], set()
            for name, m in lora.modules.items():
                found = _resolve(transformer, name)
                if found is None:
                    for k in m.keys:
                        unmatched.setdefault(k, "no such module in this model")
                    continue
                kind, obj = found
                if m.down is not None:
                    if kind != "module" or not isinstance(obj, (torch.nn.Linear, torch.nn.Conv3d, torch.nn.Conv2d)):
                        raise CliploomError(
                            f"LoRA {path}: {m.keys[0]} adapts {name}, a {type(obj).__name__} that LoRA pairs cannot adapt",
                            "the file is malformed or for another model",
                        )
                    w = obj.weight
                    down_key = next(k for k in m.keys if formats._split_lora_key(k)[1] == "down")
                    up_key = next(k for k in m.keys if formats._split_lora_key(k)[1] == "up")
                    if tuple(m.down.shape[1:]) != tuple(w.shape[1:]):
                        raise _fit_error(path, down_key, m.down.shape, f"{name}.weight", w.shape)
                    if m.up.shape[0] != w.shape[0] or m.up.shape[2:] != torch.Size([1] * (w.dim() - 2)):
                        raise _fit_error(path, up_key, m.up.shape, f"{name}.weight", w.shape)
                    _check_range(path, m, name, float(spec.weight), w.dtype)
                    if direct and _plain(obj):
                        applied.merges.append((obj, m))
                        applied.direct[attr] = applied.direct.get(attr, 0) + 1
                    else:
                        pairs.append(name)
                    touched.add(name)
                if m.diff is not None:
                    param = obj.weight if kind == "module" else obj
                    key = next(k for k in m.keys if k.endswith((".diff", ".diff_m")))
                    if tuple(m.diff.shape) != tuple(param.shape):
                        raise _fit_error(path, key, m.diff.shape, name + (".weight" if kind == "module" else ""), param.shape)
                    applied.deltas.append(_Delta(param, m.diff.float().to(param.device)))
                    touched.add(name)
                bias = m.bias_delta()
                if bias is not None:
                    key = next(k for k in m.keys if k.endswith((".diff_b", ".lora_B.bias")))
                    if kind != "module" or getattr(obj, "bias", None) is None:
                        raise CliploomError(f"LoRA {path}: {key} changes the bias of {name}, which has none",
                                            "the LoRA is for another model variant")
                    if tuple(bias.shape) != tuple(obj.bias.shape):
                        raise _fit_error(path, key, bias.shape, f"{name}.bias", obj.bias.shape)
                    applied.deltas.append(_Delta(obj.bias, bias.to(obj.bias.device)))
                    touched.add(name)
            if pairs:
                with warnings.catch_warnings():  # a stack is several adapters by design
                    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                    transformer.load_lora_adapter(lora.peft_state_dict(set(pairs)), adapter_name=applied.adapter,
                                                  prefix=None)
                transformer.requires_grad_(False)
                compute = getattr(transformer, "_cliploom_compute_dtype", None)
                if compute is not None:  # fp8 storage: peft made the adapter in the base layer's fp8
                    for module in transformer.modules():
                        for part in ("lora_A", "lora_B"):
                            layer = getattr(module, part, None)
                            if isinstance(layer, torch.nn.ModuleDict) and applied.adapter in layer:
                                layer[applied.adapter].to(compute)
                applied.pairs[attr] = self._count_adapters(transformer, applied.adapter)
            applied.modules[attr] = len(touched)
        applied.n_deltas = len(applied.deltas)
        # A key is unapplied if no targeted expert took it.
        taken = {k for name, m in lora.modules.items() for k in m.keys
                 if any(_resolve(getattr(pipe, a), name) is not None for a in targets)}
        unapplied = {**lora.ignored, **{k: why for k, why in unmatched.items() if k not in taken}}
        applied.unapplied = sorted(unapplied)
        if not any(applied.modules.values()):
            example = next(iter(lora.modules.values()))
            raise CliploomError(
                f"LoRA {path} matches no module of model {self.model.path} ({lora.layout} layout, "
                f"{len(lora.modules)} modules such as {example.source} -> {example.target})",
                "it is a LoRA for another model: `cliploom inspect` it",
            )
        if unapplied:
            by_reason: dict[str, list[str]] = {}
            for k in applied.unapplied:
                by_reason.setdefault(unapplied[k], []).append(k)
            groups = [(formats.summarise_keys(keys), why) for why, keys in by_reason.items()]
            shown = "; ".join(f"{', '.join(names[:_SHOW])}{' ...' if len(names) > _SHOW else ''} ({why})"
                              for names, why in groups)
            log.warning("LoRA %s: %d key(s) not applied: %s", path.name, len(unapplied), shown)
        return applied

    def _merge_direct(self) -> None:
        """Merge the pairs kept by ``_apply_one(direct=True)`` (:func:`add_low_rank`, with A scaled
        by alpha / rank as peft holds it). The pairs are then dropped, as a fused stack's are."""
        terms: dict[int, tuple[torch.nn.Module, list]] = {}
        for a in self.applied:
            for layer, m in a.merges:
                terms.setdefault(id(layer), (layer, []))[1].append((float(a.spec.weight), m.up, m.down.float() * m.scale))
            a.merges = []
        for layer, parts in terms.values():
            add_low_rank(layer.weight, parts)

    @staticmethod
    def _count_adapters(transformer, adapter: str) -> int:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return sum(1 for m in transformer.modules()
                   if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {}))

    def _write_deltas(self) -> None:
        """Set every delta'd parameter to base + sum(weight * delta), from the kept base copy."""
        terms: dict[int, list[tuple[float, torch.Tensor]]] = {}
        for a in self.applied:
            for d in a.deltas:
                self._base.setdefault(id(d.param), (d.param, d.param.detach().clone()))
                terms.setdefault(id(d.param), []).append((a.weight, d.delta))
        with torch.no_grad():
            for key, (param, base) in self._base.items():
                value = base.float()
                for w, delta in terms.get(key, []):
                    value = value + w * delta
                param.copy_(value.to(param.dtype))

    def clear(self) -> None:
        """Remove an unfused stack: adapters deleted, delta'd parameters restored."""
        if self.fused:
            raise CliploomError("fused LoRAs cannot be removed", "load a new Engine")
        self.unmerge()  # peft would drop the adapters and leave their merged deltas in the weights
        pipe = self.model.pipe
        with torch.no_grad():
            for param, base in self._base.values():
                param.copy_(base)
        self._base.clear()
        ours = {f"cliploom_{i}" for i in range(len(self.applied) + 1)}
        for attr in ("transformer", "transformer_2"):
            module = getattr(pipe, attr)
            loaded = set(getattr(module, "peft_config", None) or {}) if module is not None else set()
            if loaded and loaded <= ours:
                module.unload_lora()  # only our adapters: back to plain layers
            elif loaded & ours:
                module.delete_adapters(sorted(loaded & ours))  # leave adapters others attached
        self.applied = []
        self._key = None

    # -- per clip ------------------------------------------------------------------------------
    def set_clip_weights(self, weights: dict[str, float] | None) -> None:
        """Per-clip LoRA weights by name (unfused stacks only); None restores the stack's weights."""
        wanted = {a.spec.name: float(a.spec.weight) for a in self.applied}
        if weights:
            unknown = sorted(set(weights) - set(wanted))
            if unknown:
                raise CliploomError(f"per-clip weights for unknown LoRAs {unknown}", f"use names among {sorted(wanted)}")
            wanted.update({k: float(v) for k, v in weights.items()})
        if all(wanted[a.spec.name] == a.weight for a in self.applied):
            return
        if self.fused:
            raise CliploomError("per-clip LoRA weights need unfused LoRAs", "set fuse_loras: false (or --no-fuse)")
        self.unmerge()  # merged deltas were scaled by the old weights
        offload = getattr(self.model, "_cliploom_offload", "none")
        changed = [a for a in self.applied if wanted[a.spec.name] != a.weight and a.deltas]
        if changed and offload in ("group", "sequential"):
            raise CliploomError(
                f"LoRA {changed[0].spec.name} has full deltas (.diff/.diff_b), whose per-clip weights cannot change "
                f"under offload {offload!r} (the offloaded copies would keep the old values)",
                "use --offload model, or keep this LoRA's weight fixed across clips",
            )
        for a in self.applied:
            a.weight = wanted[a.spec.name]
        pipe = self.model.pipe
        for attr in ("transformer", "transformer_2"):
            adapters = [a for a in self.applied if a.pairs.get(attr)]
            if adapters:
                _set_adapters(getattr(pipe, attr), [a.adapter for a in adapters], [a.weight for a in adapters])
        self._write_deltas()

    def merge(self) -> bool:
        """Merge the unfused stack's adapters into the weights at their present weights
        (:func:`add_low_rank`, the fused stack's arithmetic), keeping them: sampling runs at the base model's
        speed until the weights change, when :meth:`unmerge` puts back a copy of the weights as they
        were (exact, so a story gives the same frames whatever the engine ran before; the copy is
        kept in host memory). Only into float32 weights: in bf16 / fp16 a merged delta is rounded
        into the weights (LoRA deltas under half an ulp vanish), the difference from an unfused
        stack that ``fuse_loras: false`` asks to avoid; such stacks stay unfused. Returns whether
        the stack is merged."""
        if self.merged or self.fused or not any(a.pairs for a in self.applied):
            return self.merged
        if getattr(self.model, "_cliploom_offload", None) in ("group", "sequential"):
            return False  # the offloaded copies would keep the unmerged weights
        from peft.tuners.tuners_utils import BaseTunerLayer

        pipe = self.model.pipe
        modules = [(attr, [a.adapter for a in self.applied if a.pairs.get(attr)]) for attr in ("transformer", "transformer_2")]
        modules = [(getattr(pipe, attr), names) for attr, names in modules if names]
        layers = [m for t, names in modules for m in t.modules()
                  if isinstance(m, BaseTunerLayer) and any(n in getattr(m, "lora_A", {}) for n in names)]
        if any(m.get_base_layer().weight.dtype != torch.float32 for m in layers):
            return False
        self._originals = [(m, m.get_base_layer().weight.detach().to("cpu", copy=True)) for m in layers]
        self.merged = True  # from here on, unmerge restores the copies whatever happens below
        weights = {a.adapter: a.weight for a in self.applied}
        for layer in layers:  # the stack's order, its weights now (peft's own A, B: the file's, alpha folded)
            names = [a.adapter for a in self.applied if a.adapter in layer.lora_A]
            add_low_rank(layer.get_base_layer().weight,
                         [(weights[n], layer.lora_B[n].weight, layer.lora_A[n].weight) for n in names])
            layer.merged_adapters = names  # peft's record: its forward runs the base layer alone
        return True

    def unmerge(self) -> None:
        """Take a :meth:`merge`'d stack back out: the weights as they were before it (the copy, not
        a subtraction, which would leave float32 rounding behind), the adapters active again."""
        if not self.merged:
            return
        with torch.no_grad():
            for layer, original in self._originals:
                layer.get_base_layer().weight.copy_(original)
                layer.merged_adapters = []  # peft's record of what is merged: nothing now
        self._originals = []
        self.merged = False

    def weights(self) -> dict[str, float]:
        """The weight each LoRA has now, by name."""
        return {a.spec.name: a.weight for a in self.applied}

    # -- reporting -----------------------------------------------------------------------------
    def _line(self, a: _Applied) -> str:
        where = ", ".join(f"{n} modules on {attr}" for attr, n in a.modules.items())
        ranks = "/".join(map(str, a.ranks)) or "-"
        state = "fused" if self.fused else "merged" if self.merged else "unfused"
        extra = f"; {len(a.unapplied)} key(s) not applied" if a.unapplied else ""
        return f"LoRA {a.spec.name} ({a.layout}, rank {ranks}) weight {a.spec.weight} {state}: {where}{extra}"

    def summary(self) -> list[dict]:
        return [
            {
                "name": a.spec.name,
                "path": str(a.spec.path),
                "weight": float(a.spec.weight),
                "expert": a.spec.expert,
                "layout": a.layout,
                "ranks": a.ranks,
                "alphas": a.alphas,
                "modules": dict(a.modules),
                "adapters": {k: a.pairs.get(k, 0) + a.direct.get(k, 0) for k in a.targets if k in a.pairs or k in a.direct},
                "deltas": a.n_deltas,
                "unapplied": list(a.unapplied),
                "fused": self.fused,
                "merged": self.merged,
            }
            for a in self.applied
        ]
