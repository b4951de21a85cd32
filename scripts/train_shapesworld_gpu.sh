#!/usr/bin/env bash
# The built-in ShapesWorld model's GPU stage as one timed job (docs/shapesworld.md, "Training
# recipe"), run from the repository root on a machine with one GPU:
#   1. the VAE decoder resumes runs/vae (vae_recipe_gpu.yaml) while
#   2. the DiT continues from the CPU run's weights on fresh clips (dit_recipe_gpu.yaml);
#   3. a base model folder from the new DiT, and both SVI LoRAs (error recycling and its
#      no-ER twin, configs/svi-shapesworld.yaml and -noer.yaml) trained on it side by side, each
#      exported (bf16, SVI layout) from its last checkpoint; this is the LoRA recipe's stage 1:
#      stages 2 and 3 (configs/svi-shapesworld*-stage{2,3}.yaml, `init_lora`) continue from it;
#   4. the results worth keeping (weights, logs, CSVs; no data, no optimiser states except the
#      VAE's) packed into OUT as pack.tar.part-* (cat them, then tar -xf at the repository root).
# Every step has a deadline inside BUDGET seconds; a step that fails does not stop the others.
#   scripts/train_shapesworld_gpu.sh OUT [BUDGET_S]
set -u
OUT=${1:?usage: scripts/train_shapesworld_gpu.sh OUT [BUDGET_S]}
BUDGET=${2:-540}
PY=${PYTHON:-python3}
SW=src/cliploom/shapesworld
VAE_RECIPE=${VAE_RECIPE:-$SW/vae_recipe_gpu.yaml}
DIT_RECIPE=${DIT_RECIPE:-$SW/dit_recipe_gpu.yaml}
SVI_CONFIGS=${SVI_CONFIGS:-"configs/svi-shapesworld.yaml configs/svi-shapesworld-noer.yaml"}
G=runs/gpu
T0=$(date +%s)
left() { echo $((BUDGET - $(date +%s) + T0)); }
log() { echo "[$(($(date +%s) - T0)) s] $*" | tee -a "$OUT/driver.log"; }
mkdir -p "$OUT" "$G"
key() { $PY -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }
DIT_DIR=$(key "$DIT_RECIPE" out_dir)
VAE_DIR=$(key "$VAE_RECIPE" out_dir 2>/dev/null || echo runs/vae)
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The CPU recipe's DiT (the shipped transformer holds the same tensors as runs/dit/final).
INIT=$(key "$DIT_RECIPE" init_from)
if [ -n "$INIT" ] && [ ! -d "$INIT" ]; then mkdir -p "$(dirname "$INIT")" && cp -r $SW/model/transformer "$INIT"; fi

log "1-2. VAE decoder and DiT start"
$PY -m cliploom.shapesworld.train_vae "$VAE_RECIPE" >"$G/vae.log" 2>&1 &
VAE=$!
timeout -s TERM $(($(left) - ${DIT_RESERVE:-240})) $PY -m cliploom.shapesworld.train_dit "$DIT_RECIPE" >"$G/dit.log" 2>&1
rc=$?
log "DiT done (exit $rc): $(tail -n 1 "$G/dit.log")"
if [ ! -f "$DIT_DIR/final/transformer/config.json" ]; then
  $PY -c "from cliploom.shapesworld.train_dit import export_checkpoint as e; e('$DIT_DIR', '$DIT_DIR/final')" >>"$G/dit.log" 2>&1
  log "DiT exported from its checkpoint (exit $?)"
fi

log "3. base model and SVI LoRAs"
$PY -m cliploom.shapesworld.build_model --vae-checkpoint "$VAE_DIR/checkpoint.pt" --frozen "$VAE_DIR/frozen" \
  --dit "$DIT_DIR/final" --out "$G/model-base" >"$G/build-base.log" 2>&1
rc=$?
log "base model (exit $rc)"
PIDS=""
for cfg in $SVI_CONFIGS; do
  name=$(basename "$cfg" .yaml)
  sed -e "s#^model: .*#model: $G/model-base#" -e "s#^out_dir: .*#out_dir: $G/$name#" "$cfg" >"$G/$name.yaml"
  timeout -s TERM $(($(left) - 60)) $PY -m cliploom.cli train-svi "$G/$name.yaml" -q >"$G/$name.log" 2>&1 &
  PIDS="$PIDS $!"
done
for p in $PIDS; do wait "$p"; done
for cfg in $SVI_CONFIGS; do
  name=$(basename "$cfg" .yaml)
  $PY -m cliploom.cli export-lora "$G/$name" -o "$G/lora-$name.safetensors" --layout svi --dtype bfloat16 >>"$G/$name.log" 2>&1
  rc=$?
  log "LoRA $name: export exit $rc; last row: $(tail -n 1 "$G/$name/train.csv" 2>/dev/null | cut -c1-60)"
done

# The VAE stage has its own budget; stop it (it checkpoints on TERM) if it runs past ours.
timeout $(($(left) - 25)) tail --pid=$VAE -f /dev/null || kill -TERM $VAE
wait $VAE
log "VAE done: $(tail -n 1 "$G/vae.log")"

log "4. pack"
FILES=$(ls -d "$VAE_DIR"/checkpoint.pt "$VAE_DIR"/final "$VAE_DIR"/*.csv "$VAE_DIR"/*.json \
  "$DIT_DIR"/final "$DIT_DIR"/*.csv "$DIT_DIR"/*.json "$G"/*.log "$G"/*.yaml "$G"/lora-*.safetensors \
  "$G"/*/train.csv "$G"/*/config.json 2>/dev/null)
tar -cf "$G/pack.tar" $FILES && split -b 15M "$G/pack.tar" "$OUT/pack.tar.part-"
log "packed $(du -b "$G/pack.tar" | cut -f1) bytes"
