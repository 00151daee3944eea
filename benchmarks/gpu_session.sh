#!/usr/bin/env bash
# One phase of a GPU session, run from the repository root on a machine with NVIDIA GPUs.
# Wheels in .whl/ (packages the machine lacks) are installed to /tmp/site first; data the
# experiments read is expected in .device_data/ (a copy of ../shared/data, never committed).
#
#   OUT=/path bash benchmarks/gpu_session.sh probe|bench|tofu|tofu-real|ddp [args]
set -euo pipefail
phase=${1:?phase: probe, bench, tofu, tofu-real or ddp}
shift
out=${OUT:-/tmp/forgetful_out}
mkdir -p "$out"
quiet() { grep -v "it/s]" || true; }  # drop progress bars; never fail the pipeline
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
case "$phase" in
  probe)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
    python3 -c "import torch, transformers, accelerate, pyarrow, fsspec, huggingface_hub as h; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'pyarrow', pyarrow.__version__, 'fsspec', fsspec.__version__, 'hub', h.__version__, 'gpus', torch.cuda.device_count())"
    python3 -c "import datasets, rouge_score, forgetful.tofu.evaluation; print('datasets', datasets.__version__, 'imports ok')"
    ;;
  bench)
    python3 benchmarks/bench_masks.py --size gpt2-small --n 1024 --batch 32 --out "$out/bench_masks.json" "$@"
    python3 benchmarks/bench_forgetting.py --size gpt2-small --lengths 1024,4096 --batch 32 --out "$out/bench_forgetting.json"
    python3 benchmarks/bench_selective.py --size gpt2-small --seq 1024 --batch 16 --out "$out/bench_selective.json"
    ;;
  tofu)
    # Pretrain a GPT-2-small-size model on WikiText-2 (valid) once: the one initialisation. Then the
    # TOFU experiment on the real data, one run at a time; after each, the small result files are
    # packed into $out so that a run cut short still returns what finished.
    work=/tmp/forgetful_tofu
    if [ ! -f "$work/init/results.json" ]; then
      python3 -m forgetful pretrain --model small-gpt2 --train-file .device_data/wikitext2/valid.txt \
        --eval-file .device_data/wikitext2/test.txt --out "$work/init" --epochs 8 --batch-size 32 \
        --learning-rate 6e-4 --block-size 512 --logging-steps 50 2>&1 | quiet
      cp "$work/init/results.json" "$out/init_results.json"
    fi
    exp=(--model "$work/init" --data-dir .device_data/tofu --out "$work/tofu" --forget-split forget10
         --epochs "${EPOCHS:-6}" --learning-rate "${LR:-3e-4}" --batch-size 32 --eval-batch-size 128 "$@")
    for run in ${RUNS:-retain full full_forget_answers full_forget_facts full_goldfish full_random}; do
      python3 -m forgetful tofu-experiment "${exp[@]}" --only "$run" 2>&1 | quiet
      (cd "$work" && tar czf "$out/tofu_runs.tar.gz" --exclude=checkpoints --exclude=model tofu)
    done
    python3 -m forgetful tofu-experiment "${exp[@]}" 2>&1 | tail -12
    (cd "$work" && tar czf "$out/tofu_runs.tar.gz" --exclude=checkpoints --exclude=model tofu)
    ;;
  tofu-real)
    # The TOFU experiment on SmolLM2-135M-Instruct (chat template), forget10, with open-unlearning's
    # finetuning and unlearning recipes (the defaults of tofu-experiment), one run at a time. The
    # unlearning runs start from the full run's model: run them in the same call as `full` (or on the
    # same warm machine). Earlier runs' results come back in $out/tofu_real_runs.tar.gz; carry that
    # file as .device_out/tofu_real_runs.tar.gz to a later call and they are reused.
    work=/tmp/forgetful_tofu_real
    mkdir -p "$work"
    if [ -f .device_out/tofu_real_runs.tar.gz ] && [ ! -d "$work/tofu" ]; then
      tar xzf .device_out/tofu_real_runs.tar.gz -C "$work"
    fi
    exp=(--model "${MODEL:-smollm2-135m}" --data-dir .device_data/tofu --out "$work/tofu" --forget-split forget10
         --eval-batch-size "${EVAL_BATCH:-128}" "$@")
    for run in ${RUNS:-retain full full_grad_diff full_npo full_forget_answers full_forget_facts full_goldfish}; do
      python3 -m forgetful tofu-experiment "${exp[@]}" --only "$run" 2>&1 | quiet
      (cd "$work" && tar czf "$out/tofu_real_runs.tar.gz" --exclude=checkpoints --exclude=model tofu)
    done
    python3 -m forgetful tofu-experiment "${exp[@]}" 2>&1 | tail -12
    (cd "$work" && tar czf "$out/tofu_real_runs.tar.gz" --exclude=checkpoints --exclude=model tofu)
    ;;
  ddp)
    # Throughput of both trainers on 1 and on all GPUs at the same per-GPU batch (DDP over NCCL), and
    # FSDP2 for the Trainer path. A throwaway run first: a fresh machine's first run is slow
    # (seen 2026-11-22: 0.13-0.14 s/step cold vs 0.06 warm). Each measurement twice (the spread).
    gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
    bench() {  # bench NPROC OUTNAME ARGS...
      local n=$1 name=$2; shift 2
      # one process sees one GPU: with several visible, HF Trainer would wrap it in DataParallel
      CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) torchrun --standalone --nproc_per_node "$n" benchmarks/bench_ddp.py \
        --size small --per-device-batch "${BATCH:-32}" --warmup 5 --authors 40 --workdir "/tmp/bench_$name" \
        --out "$out/$name.json" "$@" 2>&1 | quiet | grep '^{"trainer' || true
    }
    trainers=${TRAINERS:-selective reinforce}
    bench 1 warmup_throwaway --trainer "${trainers%% *}" --steps 10
    for rep in ${REPS:-1 2}; do
      for trainer in $trainers; do
        for n in 1 "$gpus"; do bench "$n" "ddp_${trainer}_${n}gpu_rep$rep" --trainer "$trainer" --steps "${STEPS:-25}"; done
      done
      if [[ " $trainers " == *" selective "* ]]; then
        bench "$gpus" "fsdp_selective_${gpus}gpu_rep$rep" --trainer selective --fsdp --steps "${STEPS:-25}"
      fi
    done
    ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac
