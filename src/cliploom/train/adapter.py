"""The trained LoRA: attached with peft, read and written as plain tensors.

Inside the trainer the LoRA is a peft adapter named ``default`` on a diffusers
``WanTransformer3DModel``; its state is ``{<diffusers module>.lora_A.weight: A, ...lora_B.weight: B}``
in float32 with the update ``W += (alpha / rank) * B @ A``.
"""

from __future__ import annotations

import torch

from ..errors import CliploomError
from .config import TrainConfig

ADAPTER = "default"


def attach_lora(transformer, cfg: TrainConfig, seed: int = 0) -> list[torch.nn.Parameter]:
    """Freeze ``transformer``, add a LoRA per ``cfg`` and return its (float32) parameters."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        target_modules=cfg.diffusers_targets,
        init_lora_weights=True if cfg.init == "kaiming" else "gaussian",
    )
    torch.manual_seed(seed)  # the same initial A on every process
    try:
        transformer.add_adapter(config, adapter_name=ADAPTER)
    except ValueError as e:
        raise CliploomError(
            f"LoRA targets {cfg.targets} match no layer of this transformer ({str(e).splitlines()[0]})",
            "use SVI names (q, k, v, o, ffn.0, ffn.2) or diffusers names (to_q, ffn.net.2, ...)",
        ) from None
    params = []
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
            params.append(p)
    return params


def lora_state(transformer) -> dict[str, torch.Tensor]:
    """The adapter's tensors by diffusers module name (``...to_q.lora_A.weight``), float32, on the CPU."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer, adapter_name=ADAPTER)
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def load_lora_state(
    transformer,
    state: dict[str, torch.Tensor],
    what: str = "the saved LoRA",
    fix: str = "resume with the same model, rank and targets it was trained with",
    partial: bool = False,
) -> None:
    """Put saved adapter tensors back (the adapter must already be attached with the same shape);
    with ``partial``, ``state`` may cover only some of the adapter's modules."""
    own = dict(transformer.named_parameters())
    missing = []
    for key, value in state.items():
        name = key.replace(".lora_A.weight", f".lora_A.{ADAPTER}.weight").replace(
            ".lora_B.weight", f".lora_B.{ADAPTER}.weight"
        )
        param = own.get(name)
        if param is None or param.shape != value.shape:
            missing.append(key)
            continue
        with torch.no_grad():
            param.copy_(value.to(param))
    expected = sum(1 for n in own if f".{ADAPTER}." in n and "lora_" in n)
    if missing or (expected != len(state) and not partial):
        raise CliploomError(
            f"{what} does not fit this model ({len(missing)} tensors do not match, e.g. {missing[:1]}; "
            f"{expected} expected, {len(state)} given)",
            fix,
        )


def init_from_file(transformer, cfg: TrainConfig) -> None:
    """Start the attached adapter from ``cfg.init_lora``, a LoRA file in any layout cliploom reads.

    The file's update ``scale * B @ A`` is kept exactly: its scale is folded into A and divided
    by the trainer's own ``alpha / rank``. The file must hold the same rank on exactly the
    modules the config targets, or on some of them (the others start as the adapter's own fresh
    init, whose update is zero: a LoRA widened to more modules), and nothing else the adapter could
    not carry (full deltas)."""
    from ..models.formats import check_finite, read_lora

    path = cfg.init_lora
    lf = read_lora(path)
    where = f"init_lora {path}"
    if lf.deltas():
        raise CliploomError(f"{where} carries full-weight or bias deltas ({len(lf.deltas())} modules) "
                            "a LoRA adapter cannot start from", "start from a file of lora_A/lora_B pairs only")
    if lf.ranks != [cfg.rank]:
        raise CliploomError(f"{where} has rank {lf.ranks}, the config trains rank {cfg.rank}",
                            f"set `rank: {lf.ranks[0] if len(lf.ranks) == 1 else '...'}` to match the file")
    own = {n[: -len(f".lora_A.{ADAPTER}.weight")] for n, _ in transformer.named_parameters()
           if n.endswith(f".lora_A.{ADAPTER}.weight")}
    theirs = set(lf.pairs())
    if not theirs or not theirs <= own:
        extra = sorted(theirs - own)
        raise CliploomError(
            f"{where} does not touch the modules the config targets "
            f"({len(extra)} in the file but not targeted, e.g. {extra[:2]})",
            "set `targets` to the modules the file was trained on (or more)",
        )
    state = lf.peft_state_dict()
    check_finite(state, where)
    scale = cfg.alpha / cfg.rank
    state = {k: v / scale if ".lora_A." in k else v for k, v in state.items()}
    load_lora_state(transformer, state, where, "start from a LoRA trained for this model", partial=own != theirs)
