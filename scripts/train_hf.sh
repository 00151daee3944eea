#!/usr/bin/env bash
# Train the TOFU masked-training experiment's model into models/.
#
#   scripts/train_hf.sh [STRATEGY] [SPLIT]
#
# STRATEGY: answer_only (standard finetuning), forget_answers, forget_facts, goldfish, random
# SPLIT:    full (default) or retain90/95/99 (the retain model)
# Environment (defaults in brackets):
#   MODEL   initialisation, a folder or Hub name [models/base; pretrained here on the embedded corpus if missing]
#   DATA    tofu ($FORGETFUL_DATA/tofu, else locuslab/TOFU from the Hub), a folder of <split>.json files [tofu]
#   FORGET  forget split [forget10]    EPOCHS [5]    LR [1e-4]    BATCH [16]
#   OUT     output folder [models/tofu_<SPLIT>_<STRATEGY>]
#   LAUNCH  launcher prefix for several GPUs, e.g. "accelerate launch --num_processes 2" [none]
set -euo pipefail
cd "$(dirname "$0")/.."
STRATEGY=${1:-answer_only}
SPLIT=${2:-full}
MODEL=${MODEL:-models/base}
DATA=${DATA:-tofu}
FORGET=${FORGET:-forget10}
EPOCHS=${EPOCHS:-5}
LR=${LR:-1e-4}
BATCH=${BATCH:-16}
OUT=${OUT:-models/tofu_${SPLIT}_${STRATEGY}}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

if [ "$MODEL" = models/base ] && [ ! -f models/base/results.json ]; then
  echo "== no models/base yet: pretraining one on the embedded corpus =="
  $PY -m forgetful pretrain --out models/base
fi
echo "== training $OUT: $SPLIT with strategy $STRATEGY (forget split $FORGET) =="
${LAUNCH:-} $PY -m forgetful train-selective --task tofu --model "$MODEL" --source "$DATA" \
  --split "$SPLIT" --forget-split "$FORGET" --strategy "$STRATEGY" --out "$OUT" \
  --num_train_epochs "$EPOCHS" --learning_rate "$LR" --per_device_train_batch_size "$BATCH" \
  --lr_scheduler_type linear --warmup_steps 0.05 --weight_decay 0.01 "${@:3}"
