#!/usr/bin/env bash
# CPU evidence for issue 30 (2-core CPU, no GPU): SmolLM2-135M-Instruct zero-shot, from the worktree of one commit
set -u
cd /tmp/evidence
export PYTHONPATH=/tmp/evidence/src HF_HUB_OFFLINE=1 FORGETFUL_DATA=/work/shared/data TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=/work/main/.venv/bin/python
OUT=/tmp/evidence_out; mkdir -p $OUT
COMMON="--model smollm2-135m --eval-batch-size 8 --timing-repeats 0 --disable-tqdm true --bootstrap 2000"
SAVED=benchmarks/results/forget_real/2026-12-04_session2/text/policies/residual_0.25,benchmarks/results/forget_real/2026-12-04_session2/text/policies/residual_0.5
TEXT="--task text --train-file wikitext2:valid --eval-file wikitext2:test --context-length 1024 --target-length 32 --unread-length 32 --eval-examples 24 --block-windows 3 --train-examples 64 --val-examples 8"
Z_TEXT="identity,none,random,recency,lexical,snapkv:layer=4,gemfilter:layer=4,random@unit,recency@unit,lexical@unit,snapkv:layer=4@unit,gemfilter:layer=4@unit,gemfilter@unit"
# (d) the relaxed and supervised learners end to end at keep 0.25, and (a) the zero-shot comparison at both keeps
$PY -m forgetful forget-experiment $COMMON $TEXT --out $OUT/text --keep 0.25 --learners relaxed,supervised --seeds 0 \
  --policy-steps 16 --policy-eval-steps 8 --batch-size 4 --label-rows 8 --label-rounds 1 --oracle oracle:rounds=2@unit \
  --oracle-examples 8 --zero-shot $Z_TEXT --saved-policies $SAVED --finetuned identity \
  --only policy_residual_relaxed_0.25_s0,policy_residual_supervised_0.25_s0,zero_shot_0.25,oracle_0.25 > $OUT/text_0.25.log 2>&1
$PY -m forgetful forget-experiment $COMMON $TEXT --out $OUT/text --keep 0.125 --policies "" --oracle oracle:rounds=2@unit \
  --oracle-examples 8 --zero-shot $Z_TEXT --saved-policies $SAVED --finetuned identity --only zero_shot_0.125,oracle_0.125 > $OUT/text_0.125.log 2>&1
# (c) multi-hop, 40 questions
Z_QA="identity,none,random,recency,lexical,snapkv:layer=4,gemfilter:layer=4,random@unit,recency@unit,lexical@unit,lexical:rounds=2@unit,snapkv:layer=4@unit,gemfilter:layer=4@unit,gemfilter@unit"
$PY -m forgetful forget-experiment $COMMON --task multihop --out $OUT/multihop --keep 0.25,0.125 --policies "" --oracle oracle:rounds=2,exhaustive=0@unit \
  --oracle-examples 16 --zero-shot $Z_QA --finetuned identity --train-examples 200 --val-examples 8 \
  --only zero_shot_0.25,oracle_0.25,zero_shot_0.125,oracle_0.125 > $OUT/multihop.log 2>&1
# (b) TOFU-QA, 40 questions (one per held-out author)
$PY -m forgetful forget-experiment $COMMON --task tofu_qa --data tofu --held-out-authors 40 --questions-per-author 1 --out $OUT/tofu_qa \
  --keep 0.25,0.125 --policies "" --oracle oracle:rounds=2,exhaustive=0@unit --oracle-examples 8 --zero-shot $Z_QA --finetuned identity \
  --max-new-tokens 0 --val-examples 8 --only zero_shot_0.25,oracle_0.25,zero_shot_0.125,oracle_0.125 > $OUT/tofu_qa.log 2>&1
echo done > $OUT/DONE
