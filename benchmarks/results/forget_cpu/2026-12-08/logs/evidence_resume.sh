#!/usr/bin/env bash
set -u
cd /tmp/evidence
export PYTHONPATH=/tmp/evidence/src HF_HUB_OFFLINE=1 FORGETFUL_DATA=/work/shared/data TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=/work/main/.venv/bin/python
OUT=/tmp/evidence_out
COMMON="--model smollm2-135m --eval-batch-size 8 --timing-repeats 0 --disable-tqdm true --bootstrap 2000"
SAVED=benchmarks/results/forget_real/2026-12-04_session2/text/policies/residual_0.25,benchmarks/results/forget_real/2026-12-04_session2/text/policies/residual_0.5
TEXT="--task text --train-file wikitext2:valid --eval-file wikitext2:test --context-length 1024 --target-length 32 --unread-length 32 --eval-examples 24 --block-windows 3 --train-examples 64 --val-examples 8"
Z_TEXT="identity,none,random,recency,lexical,snapkv:layer=4,gemfilter:layer=4,random@unit,recency@unit,lexical@unit,snapkv:layer=4@unit,gemfilter:layer=4@unit,gemfilter@unit"
$PY -m forgetful forget-experiment $COMMON $TEXT --out $OUT/text --keep 0.25 --learners relaxed,supervised --seeds 0 \
  --policy-steps 16 --policy-eval-steps 8 --batch-size 4 --label-rows 8 --label-rounds 1 --oracle oracle:rounds=2@unit \
  --oracle-examples 8 --zero-shot $Z_TEXT --saved-policies $SAVED --finetuned identity \
  --only policy_residual_relaxed_0.25_s0,policy_residual_supervised_0.25_s0,zero_shot_0.25,oracle_0.25 > $OUT/text_0.25_rerun.log 2>&1
Z_QA="identity,none,random,recency,lexical,snapkv:layer=4,gemfilter:layer=4,random@unit,recency@unit,lexical@unit,lexical:rounds=2@unit,snapkv:layer=4@unit,gemfilter:layer=4@unit,gemfilter@unit"
$PY -m forgetful forget-experiment $COMMON --task tofu_qa --data tofu --held-out-authors 40 --questions-per-author 1 --out $OUT/tofu_qa \
  --keep 0.25,0.125 --policies "" --oracle oracle:rounds=2,exhaustive=0@unit --oracle-examples 8 --zero-shot $Z_QA --finetuned identity \
  --max-new-tokens 0 --val-examples 8 --only zero_shot_0.25,oracle_0.25,zero_shot_0.125,oracle_0.125 > $OUT/tofu_qa_resume.log 2>&1
echo done > $OUT/DONE2
