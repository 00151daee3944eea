#!/usr/bin/env bash
# Score a trained TOFU model with the TOFU metrics (forget quality needs the retain model's results).
#
#   scripts/eval_hf.sh MODEL_DIR [RETAIN_EVAL_JSON [eval-tofu options ...]]
#
# Environment: DATA [tofu: $FORGETFUL_DATA/tofu, else the Hub], FORGET [forget10], OUT [MODEL_DIR/eval],
#              MAX_NEW_TOKENS [200], BATCH [64]
# Example: scripts/eval_hf.sh models/tofu_retain90_answer_only
#          scripts/eval_hf.sh models/tofu_full_forget_facts models/tofu_retain90_answer_only/eval/tofu_eval.json
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: scripts/eval_hf.sh MODEL_DIR [RETAIN_EVAL_JSON]}
RETAIN=${2:-}
DATA=${DATA:-tofu}
FORGET=${FORGET:-forget10}
OUT=${OUT:-$MODEL/eval}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
ARGS=(--model "$MODEL" --data-dir "$DATA" --forget-split "$FORGET" --out "$OUT"
      --max-new-tokens "${MAX_NEW_TOKENS:-200}" --eval-batch-size "${BATCH:-64}")
[ -n "$RETAIN" ] && ARGS+=(--retain-eval "$RETAIN")
$PY -m forgetful eval-tofu "${ARGS[@]}" "${@:3}"  # extra eval-tofu options pass through
echo "== $OUT/tofu_summary.json =="
cat "$OUT/tofu_summary.json"
