#!/usr/bin/env bash
# The built-in SVI LoRA's three-stage recipe and its no-error-recycling twin, trained again from
# another seed: the spread over LoRA *training* seeds that the error-recycling ablation needs
# (docs/benchmarks.md, issue 12). About 100 min on 2 CPU threads (six runs of ~16 min, one at a time).
#
#   bash benchmarks/train_svi_seed.sh SEED OUT_ROOT
#
# Stages 1 and 2 draw their clips from SEED, stage 3 from SEED + 1 (the shipped recipe uses 0, 0, 1).
# Writes OUT_ROOT/{er,noer}/stage{1,2,3}/ and OUT_ROOT/{er,noer}.safetensors (bf16, SVI layout).
set -euo pipefail
seed=${1:?usage: train_svi_seed.sh SEED OUT_ROOT}
root=${2:?usage: train_svi_seed.sh SEED OUT_ROOT}
cliploom=${CLIPLOOM:-cliploom}
for twin in er noer; do
  suffix=$([ "$twin" = er ] && echo "" || echo "-noer")
  out=$root/$twin
  $cliploom train-svi configs/svi-shapesworld$suffix.yaml -q --seed "$seed" --out-dir "$out/stage1"
  $cliploom export-lora "$out/stage1" -o "$out/stage1/lora_bf16.safetensors" --layout svi --dtype bfloat16
done
for twin in er noer; do
  suffix=$([ "$twin" = er ] && echo "" || echo "-noer")
  out=$root/$twin
  $cliploom train-svi configs/svi-shapesworld$suffix-stage2.yaml -q --seed "$seed" --out-dir "$out/stage2" \
    --init-lora "$out/stage1/lora_bf16.safetensors"
done
for twin in er noer; do
  suffix=$([ "$twin" = er ] && echo "" || echo "-noer")
  out=$root/$twin
  $cliploom train-svi configs/svi-shapesworld$suffix-stage3.yaml -q --seed "$((seed + 1))" --out-dir "$out/stage3" \
    --init-lora "$out/stage2/lora_svi.safetensors"
  $cliploom export-lora "$out/stage3" -o "$root/$twin.safetensors" --layout svi --dtype bfloat16
done
