#!/usr/bin/env bash
# Accuracy study on the GPU: a ~60M-parameter Llama pretrained on the larger real-text mix with the BF16 reference
# (autocast + torch fused AdamW), coat, and coat without dynamic range expansion; then a coat fine-tuning run from
# the BF16 checkpoint. The GPU box has no network: carry the prepared token files (prepare them here with
# `bash scripts/accuracy_gpu.sh --prepare`, which writes .carry/datasets/).
#
#   STAGE=pretrain VARIANTS=coat,coat-noexp SEEDS=1 TAG=s1 bash scripts/accuracy_gpu.sh     # a part per call
#   STAGE=finetune SEEDS=0 bash scripts/accuracy_gpu.sh    # bf16 pretrain, then bf16 / coat fine-tunes from it
#   STAGE=all bash scripts/accuracy_gpu.sh   # everything at once: one process per (variant, seed), spread over all
#                                            # GPUs (several per GPU); $OUT gets accuracy.tar.gz + merged tables
# Run directories (checkpoints) stay in $RUNS on the machine; $OUT gets compare-<stage>-<tag>.{json,md,png}
# (flat names: the device returns few, small files) and, for the pretrain and finetune stages,
# $OUT/results/accuracy/<stage>-<tag>.json (with date, commit, command and GPU), the layout of
# docs/results/ (`cp -r $OUT/results/* docs/results/ && python -m benchmarks.report` publishes them). Merge the JSON
# files of several calls with `python -m scripts.merge_compare`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/accuracy}"
RUNS="${RUNS:-/tmp/fp8coat-runs}"
TAG="${TAG:-run}"
MIX="${MIX:-.carry/datasets/mix}"
FT_DATA="${FT_DATA:-.carry/datasets/shakespeare-mixtok}"

if [ "${1:-}" = "--prepare" ]; then  # on a machine with network access
  python3 - <<'PY'
import os, shutil
from fp8coat.train.data import prepare_dataset
os.makedirs(".carry/datasets", exist_ok=True)
mix = prepare_dataset("mix", tokenizer="bpe", vocab_size=16384, seed=0)
shutil.copytree(mix.dir, ".carry/datasets/mix", dirs_exist_ok=True)
ft = prepare_dataset("shakespeare", tokenizer=mix.tokenizer_path, seed=0)
shutil.copytree(ft.dir, ".carry/datasets/shakespeare-mixtok", dirs_exist_ok=True)
print(mix.description, mix.n_train_tokens, "|", ft.description, ft.n_train_tokens)
PY
  exit 0
fi

COMMON=(--model 60m --seq-len 512 --batch-size 64 --lr 1.5e-3 --beta1 0.9 --beta2 0.95 --weight-decay 0.1
        --warmup-steps 50 --min-lr-ratio 0.1 --grad-clip 1.0 --eval-every 100 --eval-batches 20 --log-every 25)
if [ -n "${SMOKE:-}" ]; then  # a CPU check of the whole flow with a tiny model
  COMMON=(--model tiny --seq-len 64 --batch-size 4 --lr 3e-3 --warmup-steps 2 --eval-every 5 --eval-batches 2
          --log-every 1)
fi
STEPS="${STEPS:-500}"

publish() {  # $1: stage, $2: its compare.json; a copy in the docs/results/accuracy/ layout, with its provenance
  case "$1" in pretrain | finetune) ;; *) return 0 ;; esac
  [ -f "$2" ] || return 0
  mkdir -p "$OUT/results/accuracy"
  python3 - "$2" "$OUT/results/accuracy/$1-$TAG.json" "STAGE=${STAGE:-pretrain} TAG=$TAG bash scripts/accuracy_gpu.sh" \
    "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)" <<'PY'
import json, sys
from benchmarks import provenance
src, dst, command, gpu = sys.argv[1:5]
with open(src) as f:
    data = json.load(f)
data["meta"] = {"date": provenance.utc_now(), "commit": provenance.commit(), "command": command, "gpu": gpu or None}
with open(dst, "w") as f:
    json.dump(data, f, indent=1)
PY
}

export_results() {  # $1: stage
  mkdir -p "$OUT"
  for f in compare.json compare.md loss.png; do
    [ -f "$RUNS/$1/$f" ] && cp "$RUNS/$1/$f" "$OUT/compare-$1-$TAG.${f##*.}"
  done
  publish "$1" "$RUNS/$1/compare.json"
  cat "$RUNS/$1/compare.md"
}

case "${STAGE:-pretrain}" in
  pretrain)
    python3 -m fp8coat compare "${COMMON[@]}" --data "$MIX" --steps "$STEPS" --save-every "$STEPS" \
      --variants "${VARIANTS:-bf16-torchopt,coat,coat-noexp}" --seeds "${SEEDS:-0}" --out-dir "$RUNS/pretrain"
    export_results pretrain ;;
  finetune)
    seed="${SEEDS:-0}"
    python3 -m fp8coat compare "${COMMON[@]}" --data "$MIX" --steps "$STEPS" --save-every "$STEPS" \
      --variants bf16-torchopt --seeds "$seed" --out-dir "$RUNS/pretrain-base"
    ckpt="$(ls -d "$RUNS"/pretrain-base/bf16-torchopt_seed"$seed"/checkpoints/step_* | tail -n 1)"
    python3 -m fp8coat compare "${COMMON[@]}" --model "$ckpt" --data "$FT_DATA" --lr "${FT_LR:-3e-4}" \
      --warmup-steps 20 --steps "${FT_STEPS:-200}" --variants "${FT_VARIANTS:-bf16-torchopt,coat}" --seeds "$seed" \
      --out-dir "$RUNS/finetune"
    export_results pretrain-base
    export_results finetune ;;
  all)
    # One `fp8coat compare` process per (variant, seed) so that each finished run is complete on its own even if
    # the deadline stops the others; the fine-tunes start from the bf16 seed-0 checkpoint once it exists.
    # GPU_LIST="1 2 3" keeps the runs off GPU 0 (e.g. for a benchmark running there at the same time)
    read -r -a gpus <<< "${GPU_LIST:-$(python3 -c 'import torch; print(*range(max(torch.cuda.device_count(), 1)))')}"
    n_gpu=${#gpus[@]}
    end=$(( $(date +%s) + ${DEADLINE_S:-520} ))
    left() { echo $(( end - $(date +%s) )); }
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
    mkdir -p "$RUNS/logs" "$OUT"
    i=0
    for seed in ${SEEDS_ALL:-0 1 2}; do
      for variant in ${VARIANTS_ALL:-bf16-torchopt coat coat-noexp}; do
        gpu=${gpus[$((i % n_gpu))]}; i=$((i + 1))
        dir="$RUNS/pretrain-$variant-seed$seed"
        cmd=(python3 -m fp8coat compare "${COMMON[@]}" --data "$MIX" --steps "$STEPS" --save-every "$STEPS"
             --variants "$variant" --seeds "$seed" --out-dir "$dir")
        if [ "$variant" = bf16-torchopt ] && [ "$seed" = 0 ]; then
          ft=(python3 -m fp8coat compare "${COMMON[@]}" --data "$FT_DATA" --lr "${FT_LR:-3e-4}" --warmup-steps 20
              --steps "${FT_STEPS:-200}" --variants "${FT_VARIANTS:-bf16-torchopt,coat}" --seeds 0
              --out-dir "$RUNS/finetune")
          ( CUDA_VISIBLE_DEVICES=$gpu timeout "$(left)" "${cmd[@]}" \
            && ckpt="$(ls -d "$dir"/bf16-torchopt_seed0/checkpoints/step_* | tail -n 1)" \
            && CUDA_VISIBLE_DEVICES=$gpu timeout "$(left)" "${ft[@]}" --model "$ckpt" ) \
            >"$RUNS/logs/$variant-seed$seed.log" 2>&1 &
        else
          CUDA_VISIBLE_DEVICES=$gpu timeout "$(left)" "${cmd[@]}" >"$RUNS/logs/$variant-seed$seed.log" 2>&1 &
        fi
      done
    done
    echo "started $i runs on $n_gpu GPU(s)"
    wait || true
    for log in "$RUNS"/logs/*.log; do echo "== $log"; tail -n 3 "$log"; done
    shopt -s nullglob
    jsons=("$RUNS"/pretrain-*/compare.json)
    [ ${#jsons[@]} -gt 0 ] && python3 -m scripts.merge_compare "$RUNS/pretrain" "${jsons[@]}"
    for d in pretrain finetune; do
      for f in compare.json compare.md loss.png; do
        [ -f "$RUNS/$d/$f" ] && cp "$RUNS/$d/$f" "$OUT/compare-$d-$TAG.${f##*.}"
      done
      publish "$d" "$RUNS/$d/compare.json"
    done
    (cd "$RUNS" && tar czf "$OUT/accuracy-$TAG.tar.gz" logs pretrain-*/compare.* pretrain-*/*/metrics.jsonl \
       finetune/compare.* finetune/*/metrics.jsonl 2>/dev/null) || true
    ls -la "$OUT" ;;
  *) echo "unknown STAGE=${STAGE}" >&2; exit 2 ;;
esac
