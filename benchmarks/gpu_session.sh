#!/usr/bin/env bash
# One phase of a GPU session, run from the repository root on a machine with NVIDIA GPUs (one; two for
# the ddp phase). Inputs the project never commits travel beside the repository:
#   .whl/          wheels of packages the machine lacks (datasets, rouge-score, gguf, and the loss kernels
#                  cut-cross-entropy and liger-kernel of requirements-gpu.txt: without them bench_selective
#                  records their rows as skipped)
#   .device_data/  the files of ../shared/data a phase reads (wikitext2/; tofu/: the forget10, retain90, holdout10,
#                  retain_perturbed, real_authors, world_facts files and their _perturbed ones, full.json: 3.6 MB)
#   .device_runs/  optional: the packs an earlier call returned, unpacked, so a fresh machine continues those runs
#   .gguf_parts/   the real model's GGUF file (98 MB) in parts (`split -b 32m FILE .gguf_parts/smollm2.gguf.part`):
#                  a call carries 64 MiB with the checkout (14 MiB of it committed results), so three parts travel
#                  in three calls made one right after the other (the machine keeps /root while warm, ~30 s)
#
#   OUT=/path bash benchmarks/gpu_session.sh setup|part|model|bench_forgetting|bench_selective|bench_masks|forget|tofu|ddp
#
# setup        install the wheels into /tmp/site, copy the data and the GGUF parts carried to /root
# part         copy the GGUF parts carried to /root (a middle call)
# model        copy the parts carried, join every part, check the sha256, convert the model into the cache once
#              (`model && ... tofu` in the last call)
# The three benchmarks, one device call (600 s) each, on one GPU; each stops starting new work past
# BENCH_LIMIT seconds (default 380; a round or warm-up under way finishes) and is killed at
# BENCH_TIMEOUT (default 450: < 8 min in all); each rewrites its JSON in $OUT after every round, so a
# cut run still returns what it measured (`complete`/`stopped` in the file say how it ended);
# BENCH_EXTRA: options appended (they win: smaller sizes for a dry run on a CPU). Times are estimates:
# bench_forgetting  the compute-bound setting (SmolLM2 shape, n = 4096, batch 16, keeps 0.5 / 0.25), eager
#              and regional compile, 5 rounds -> bench_forgetting_smollm2_h200.json (about 4 min)
# bench_selective  tests/test_nll_backends_gpu.py first (gpu_tests.log; pytest's wheels in .whl/), then
#              every loss backend and the peers at densities 1 / 0.5 / 0.1 on the real SmolLM2
#              ($GGUF, after `model`; 16 x 2048) and the Llama-1B shape (random weights; 4 x 2048), with
#              grad_cosine against the fp32 dense reference -> selective_backends.json (about 5 min; if it
#              stops at its limit, BENCH_EXTRA="--models llama-1b:4x2048" in a second call measures the rest)
# bench_masks  every policy's forward and REINFORCE backward as shares of the LM step, compute-bound
#              setting -> bench_masks_smollm2_h200.json (about 2 min)
# forget       the input-forgetting experiment (issue 33), one process per task and keep ratio, each with
#              forget-experiment's --time-budget BUDGET; results packed into $OUT
# tofu         the TOFU experiment (issue 34), one tofu-experiment call with --time-budget BUDGET
# ddp          both trainers on 1 and 2 GPUs at the same per-GPU batch, three repetitions after a warm-up
#              (DDP_RUNS: a subset of selective_ddp selective_fsdp reinforce_ddp)
set -uo pipefail
phase=${1:?phase: setup, part, model, bench_forgetting, bench_selective, bench_masks, forget, tofu or ddp}
out=${OUT:-/tmp/forgetful_out}
R=${WORK:-/root}  # where models, data and runs live while the machine is warm
mkdir -p "$out" "$R/models" "$R/runs"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=/tmp/site:$PWD/src FORGETFUL_CACHE=$R/fcache
# the copy of the checkout there has no .git: the commit travels in the command (FORGETFUL_COMMIT=...)
[ -n "${FORGETFUL_COMMIT:-}" ] || FORGETFUL_COMMIT=$(cat "$R/commit" 2>/dev/null || true)
export FORGETFUL_COMMIT
GGUF=$R/models/SmolLM2-135M-Instruct.Q4_1.gguf
SHA=${GGUF_SHA256:-b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53}  # another file for a dry run
DATA=$R/data
MODEL=${MODEL:-$GGUF}  # the real model (another folder for a dry run on a CPU)
stash_parts() {  # keep the GGUF parts this call carried on the machine
  for p in .gguf_parts/*.part*; do [ -e "$p" ] && cp "$p" "$R/models/$(basename "$p")"; done; true
}
quiet() { grep -v -e "it/s\]" -e "s/it\]" || true; }  # drop progress bars
pack() {  # pack the result files of $R/runs/$1 into $out/$1.tgz (policies, no LM weights)
  [ -d "$R/runs/$1" ] && tar czf "$out/$1.tgz" -C "$R/runs" --exclude='checkpoint-*' --exclude='model*.safetensors' \
    --exclude='*.bin' --exclude='*.pt' --exclude='tokenizer*' --exclude='.lock' "$1"
}

case "$phase" in
  setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    rm -rf "$DATA" && cp -r .device_data "$DATA"
    # runs an earlier machine finished (the packs of an earlier call, unpacked into .device_runs/): continued here
    [ -d .device_runs ] && cp -r .device_runs/. "$R/runs/" && ls "$R/runs"
    stash_parts
    echo "$FORGETFUL_COMMIT" > "$R/commit"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers, datasets, rouge_score, gguf, scipy, forgetful.input.experiment, forgetful.tofu.experiment; print('torch', torch.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__, 'scipy', scipy.__version__, 'gpus', torch.cuda.device_count())"
    python3 -c "import importlib.util as u; print('loss kernels:', {m: u.find_spec(m) is not None for m in ('cut_cross_entropy', 'liger_kernel', 'triton')})"
    ;;
  bench_forgetting|bench_selective|bench_masks)
    limit=${BENCH_LIMIT:-380}
    if [ "$phase" = bench_selective ]; then  # the loss backends against float64 on this GPU before timing them
      python3 -m pytest -q -p no:cacheprovider tests/test_nll_backends_gpu.py > "$out/gpu_tests.log" 2>&1
      echo "GPU tests exit $?"; tail -n 5 "$out/gpu_tests.log"
    fi
    declare -A bench_args=(
      [bench_forgetting]="--arch smollm2 --lengths 4096 --batch 16 --keeps 0.5,0.25 --modes eager,compile \
        --compile regional --rounds 5 --repeats 5 --profile --out $out/bench_forgetting_smollm2_h200.json"
      [bench_selective]="--models smollm2-135m=$MODEL:16x2048,llama-1b:4x2048 --densities 1.0,0.5,0.1 --rounds 3 \
        --repeats 3 --out $out/selective_backends.json"
      [bench_masks]="--arch smollm2 --n 4096 --batch 16 --keep 0.5 --rounds 3 --repeats 5 \
        --out $out/bench_masks_smollm2_h200.json"
    )
    timeout -k 20 "${BENCH_TIMEOUT:-450}" python3 "benchmarks/$phase.py" ${bench_args[$phase]} --time-limit "$limit" \
      ${BENCH_EXTRA:-} > "$out/$phase.log" 2>&1
    echo "$phase exit $?"
    tail -n 40 "$out/$phase.log"
    ;;
  part)
    stash_parts; ls -la "$R/models"
    ;;
  model)
    stash_parts
    cat "$R"/models/*.part* > "$GGUF" && echo "$SHA  $GGUF" | sha256sum -c - || { ls -la "$R/models"; exit 1; }
    python3 -c "import sys; from forgetful.models import load_model; m, t = load_model(sys.argv[1]); print(m.config.num_hidden_layers, m.dtype, t.eos_token)" "$GGUF" 2>&1 | quiet
    ;;
  forget)
    budget=${BUDGET:-520}
    # Issue 33's runs: every process is one task and keep ratio (FORGET_TASKS: text, multihop, tofu_qa; KEEPS), sharing
    # one folder per task; forget-experiment's --time-budget starts a run only if its expected time fits (finished runs
    # are kept: calling again continues), `timeout` is the hard stop. LEARNERS, SEEDS, STEPS (policy steps), ONLY (a
    # --only list, KEEP standing for the keep ratio) and FORGET_EXTRA (appended: it wins) change the runs.
    common="--model $MODEL --eval-batch-size 32 --batch-size 8 --num-samples ${SAMPLES:-8} --learning-rate 2e-5 \
      --policy-learning-rate ${POLICY_LR:-1e-3} --entropy-coef ${ENTROPY:-0.01} --train-examples ${TRAIN:-1600} \
      --learners ${LEARNERS:-reinforce,relaxed,supervised} --seeds ${SEEDS:-0,1,2} --policy-steps ${STEPS:-200} \
      --policy-eval-steps ${EVAL_STEPS:-100} --val-examples ${VAL:-96} --oracle-examples ${ORACLE_ROWS:-100} \
      --time-budget $budget --disable-tqdm true"
    declare -A task_args=(
      [tofu_qa]="--task tofu_qa --data $DATA/tofu --held-out-authors 40 --max-new-tokens 32"
      [multihop]="--task multihop --oracle oracle:rounds=3,exhaustive=0@unit"
      [text]="--task text --train-file $DATA/wikitext2/valid.txt --eval-file $DATA/wikitext2/test.txt \
        --context-length 1024 --target-length 32 --stride 256 --unread-length 32 --oracle oracle:rounds=3@unit"
    )
    for task in ${FORGET_TASKS:-text multihop}; do
      for keep in ${KEEPS:-0.25}; do
        only=""; [ -n "${ONLY:-}" ] && only="--only ${ONLY//KEEP/$keep}"
        (timeout -k 30 $((budget + 60)) python3 -m forgetful forget-experiment $common ${task_args[$task]} \
           --out "$R/runs/forget_$task" --keep "$keep" $only ${FORGET_EXTRA:-} \
           > "$out/forget_${task}_$keep.log" 2>&1; true) &
      done
    done
    wait
    for task in ${FORGET_TASKS:-text multihop}; do pack "forget_$task"; done
    tail -n 4 "$out"/forget_*.log | quiet
    ls -la "$out"
    ;;
  tofu)
    budget=${BUDGET:-520}
    # Issue 34's runs: one tofu-experiment call; its --time-budget starts a run only if its expected time fits (finished
    # runs are kept: calling again continues). The built-in small model's recipe (named: MODEL is a file path); the grid,
    # seeds, evaluation epochs and mask shares come in TOFU_EXTRA (see tofu-experiment --help)
    TOFU_RECIPE="--recipe smollm2 --eval-batch-size 256 --disable-tqdm true"
    (timeout -k 30 $((budget + 60)) python3 -m forgetful tofu-experiment --model $MODEL --data-dir $DATA/tofu \
       --out $R/runs/tofu_real --forget-split forget10 --time-budget "$budget" ${TOFU_ARGS:-$TOFU_RECIPE} ${TOFU_EXTRA:-} \
       > "$out/tofu.log" 2>&1; true)
    pack tofu_real
    grep -e "not started" -e "^|" -e "Error" "$out/tofu.log" | tail -n 30; true
    ;;
  ddp)
    mkdir -p "$out/ddp"
    bench() {  # bench NPROC NAME ARGS...: one process per GPU (Trainer would use DataParallel with two visible)
      local n=$1 name=$2; shift 2
      CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) torchrun --standalone --nproc_per_node "$n" benchmarks/bench_ddp.py \
        --size "${DDP_SIZE:-smollm2}" --text "$DATA/wikitext2/valid.txt" --reps 3 --warmup 2 --steps ${STEPS:-6} \
        --workdir "/tmp/bench_$name" --out "$out/ddp/$name.json" "$@" ${DDP_EXTRA:-} > "$out/ddp/$name.log" 2>&1
      grep '^{"trainer' "$out/ddp/$name.log" || { echo "$name failed:"; tail -n 5 "$out/ddp/$name.log"; }
    }
    sel=(--trainer selective --seq 1024 --per-device-batch 16 --accumulation 8 --max-rows 2048)
    rl=(--trainer reinforce --seq 1024 --per-device-batch 8 --accumulation 6 --samples 4)
    runs=${DDP_RUNS:-selective_ddp selective_fsdp reinforce_ddp}  # a subset when device time is short
    for r in $runs; do
      case "$r" in selective_ddp|selective_fsdp|reinforce_ddp) ;; *) echo "DDP_RUNS: unknown run $r"; exit 2 ;; esac
    done
    for n in 1 2; do
      [[ " $runs " == *" selective_ddp "* ]] && bench "$n" "selective_ddp_${n}gpu" "${sel[@]}" --profile
      [[ " $runs " == *" selective_fsdp "* ]] && bench "$n" "selective_fsdp_${n}gpu" "${sel[@]}" --fsdp
      [[ " $runs " == *" reinforce_ddp "* ]] && bench "$n" "reinforce_ddp_${n}gpu" "${rl[@]}"
    done
    true
    ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac
