#!/usr/bin/env bash
# One GPU run: install the carried wheels (torchao, bitsandbytes) if present, print the environment, run the tests
# marked `gpu` and the benchmarks. Each section runs under its own time limit and writes $OUT/<section>.log; a
# failing or timed-out section does not stop the others. A summary is printed last and written to $OUT/summary.txt.
# The benchmarks' result files land in the layout of docs/results/: $OUT/results/optimizer/<RUN_ID>.json and
# $OUT/results/layers/<RUN_ID>.json (RUN_ID defaults to the UTC date and time), each recording the commit
# (FP8COAT_COMMIT, else `git rev-parse`), date, command and GPU. To publish them, from the repository root:
#   cp -r $OUT/results/* docs/results/ && python -m benchmarks.report     # rewrites docs/benchmarks.md
#
# Usage, from the repository root:  bash scripts/gpu_check.sh            (OUT defaults to /tmp/fp8coat_gpu)
# To add a benchmark: write a section_<name> function below and add "<name> <limit_s>" to SECTIONS.
# A device command may run 600 s at most: choose sections with GPU_SECTIONS (see below) to stay inside it.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
export OUT="${OUT:-/tmp/fp8coat_gpu}"
export RUN_ID="${RUN_ID:-$(date -u +%Y-%m-%d-%H%M)}"
export RESULTS="$OUT/results"
mkdir -p "$OUT" "$RESULTS/optimizer" "$RESULTS/layers" "$RESULTS/fsdp" "$RESULTS/llama7b" "$RESULTS/compile_time" \
  "$RESULTS/vlm" "$RESULTS/multi_gpu"
export PYTHONUNBUFFERED=1
if [ -z "${FP8COAT_COMMIT:-}" ]; then
  FP8COAT_COMMIT="$(git rev-parse --short HEAD 2>/dev/null || true)"
  export FP8COAT_COMMIT
fi

SECTIONS=(
  "env 45"
  "launch 60"
  "kernel_sweep 200"
  "pytest_gpu 200"
  "bench_optimizer 300"
  "bench_layers 330"
  "profile 120"
  "compile_time 300"
  "bench_fsdp 240"
  "bench_llama7b 560"
  "compile_time_torchao 300"
  "compile_time_eager 150"
  "bench_llama7b_seq4096 300"
  "vlm_compare 580"
  "multi_gpu 590"
  "bench_layers_before 330"
  "bench_optimizer_before 300"
  "compile_time_before 300"
  "launch_before 60"
)
export BEFORE="${BEFORE:-.carry/before}"
# GPU_SECTIONS="pytest_gpu bench_layers" runs a subset (one device command may run at most 600 s);
# LIMIT_<SECTION>=seconds changes one section's limit (natively, all test files take > 200 s)
if [ -n "${GPU_SECTIONS:-}" ]; then
  selected=()
  for entry in "${SECTIONS[@]}"; do
    read -r name _ <<< "$entry"
    case " $GPU_SECTIONS " in *" $name "*) selected+=("$entry") ;; esac
  done
  SECTIONS=("${selected[@]}")
fi

section_env() {
  nvidia-smi -L
  nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv || true
  python3 - <<'EOF'
import sys, torch, triton
print("python", sys.version.split()[0], "| torch", torch.__version__, "| triton", triton.__version__,
      "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
for mod in ("transformers", "torchao", "bitsandbytes"):
    try:
        print(mod, __import__(mod).__version__)
    except Exception as ex:
        print(mod, "absent:", type(ex).__name__, str(ex)[:200])
EOF
}

section_launch() {
  # where the FP8 linear's host time goes: pieces, whole calls (tiny and real shapes), cProfile
  python3 -m scripts.host_overhead_gpu
}

section_kernel_sweep() {
  # launch configurations of the norm, SwiGLU, recompute and amax kernels at the 7B's shapes (batch 16 × 2048)
  python3 -m scripts.kernel_sweep_gpu --json "$OUT/kernel_sweep.json" ${KERNEL_SWEEP_ARGS:-}
}

section_pytest_gpu() {
  # the GPU-only tests (real shapes) plus the device-aware kernel/optimizer suites, natively on the GPU
  python3 -m pytest -q -rs ${PYTEST_FILES:-tests/test_gpu.py tests/test_quantization.py tests/test_adamw.py tests/test_weight_cache.py tests/test_optim_safety.py}
}

section_bench_optimizer() {
  # BENCH_ARGS: extra arguments of both benchmarks, e.g. BENCH_ARGS=--dry-run for a quick run without a GPU;
  # BENCH_OPTIMIZER_ARGS: of this one only (e.g. --sections copy,fp8coat_fp32_exp)
  python3 -m benchmarks.bench_optimizer --out "$RESULTS/optimizer" --budget-s 200 ${BENCH_ARGS:-} \
    ${BENCH_OPTIMIZER_ARGS:-}
}

section_bench_layers() {
  # FP8 linear / decoder layer / 4-layer model training vs BF16 and torchao; BENCH_LAYERS_ARGS: extra arguments
  python3 -m benchmarks.bench_layers --out "$RESULTS/layers" --budget-s 270 ${BENCH_ARGS:-} ${BENCH_LAYERS_ARGS:-}
}

section_compile_time() {
  # build -> first steps of Llama-7B-shaped models with every decoder layer compiled, 4 and 32 layers
  python3 -m benchmarks.compile_time --layers "${COMPILE_LAYERS:-4,32}" --out "$RESULTS/compile_time" --tag after ${BENCH_ARGS:-}
}

section_bench_fsdp() {
  # the 4-layer model under fully_shard on one rank (NCCL), BF16 and FP8 all-gather, against unsharded;
  # BENCH_FSDP_ARGS: extra arguments (e.g. --compile)
  python3 -m benchmarks.fsdp --out "$RESULTS/fsdp" ${BENCH_ARGS:-} ${BENCH_FSDP_ARGS:-}
}

section_bench_llama7b() {
  # the full Llama-2-7B shape on one GPU: fp8coat rows, torchao float8 and BF16 AMP in the same run, ascending
  # batches until out of memory (its own --budget-s 540 keeps it inside the limit); BENCH_LLAMA7B_ARGS: extra
  # arguments (e.g. --profile fp8coat_best@16 --saved-bytes, --batches fp8coat_best_cache:16, --seq 4096)
  python3 -m benchmarks.llama7b --out "$RESULTS/llama7b" ${BENCH_LLAMA7B_ARGS:-}
}

section_compile_time_torchao() {
  # the compile_time section's models with torchao float8 + AdamWFp8 (as the 7B anchors), 4 and 32 layers
  python3 -m benchmarks.compile_time --library torchao --layers "${COMPILE_LAYERS:-4,32}" \
    --out "$RESULTS/compile_time" --tag after ${BENCH_ARGS:-}
}

section_vlm_compare() {
  # BF16 vs coat on llava-100m and qwen2vl-100m (synthetic scenes): speed runs alone, then 3 seeds per model in
  # parallel; reports in $RESULTS/vlm, run folders (checkpoints) outside $OUT; VLM_COMPARE_ARGS: extra arguments.
  # At the default 1,000 steps one model's accuracy runs fill a call: VLM_COMPARE_ARGS="--models llava-100m
  # --speed-steps 0", and the speed runs of both in another: VLM_COMPARE_ARGS="--steps 0"
  python3 -m benchmarks.vlm_compare --out "$RESULTS/vlm" --work-dir /tmp/fp8coat_vlm_runs --budget-s 550 \
    ${BENCH_ARGS:-} ${VLM_COMPARE_ARGS:-}
}

section_compile_time_eager() {
  # the eager first step of the compile_time section's fp8coat models (target for 32 layers: <= 10 s)
  python3 -m benchmarks.compile_time --eager --layers "${COMPILE_LAYERS:-4,32}" --out "$RESULTS/compile_time" \
    --tag after ${BENCH_ARGS:-}
}

section_bench_llama7b_seq4096() {
  # the 7B at seq 4096: fp8coat's best configuration from batch 8 up, torchao float8 and BF16 compiled at the
  # batches of seq 2048 halved; BENCH_LLAMA7B_SEQ4096_ARGS: extra arguments
  python3 -m benchmarks.llama7b --seq 4096 --rows fp8coat_best,torchao_fp8_compiled_adamwfp8,bf16amp_compiled \
    --batches "fp8coat_best:8,10,12" --budget-s 280 --out "$RESULTS/llama7b/seq4096" ${BENCH_ARGS:-} \
    ${BENCH_LLAMA7B_SEQ4096_ARGS:-}
}

section_multi_gpu() {
  # FSDP2 over GPUS GPUs (default: all visible): throughput per GPU of bf16 / torchao float8 / coat / coat with FP8
  # all-gather on Llama-2-7B and the 4-layer model, loss parity of N GPUs with 1, DCP resumes N -> N and N -> 1,
  # scaling 1 -> N with a profile (benchmarks/multi_gpu.py). One 600 s call takes either the throughput section or
  # the other three: MULTI_GPU_ARGS="--sections throughput", then MULTI_GPU_ARGS="--sections parity,dcp,scaling"
  local gpus="${GPUS:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')}"
  python3 -m benchmarks.multi_gpu --gpus "${gpus:-1}" --out "$RESULTS/multi_gpu/$RUN_ID" ${BENCH_ARGS:-} \
    ${MULTI_GPU_ARGS:-}
}

# Before/after comparisons in one run: BEFORE names a tree of an earlier commit (e.g. `git archive <commit> fp8coat
# benchmarks scripts | tar -x -C .carry/before`); its benchmarks run with its own package, same arguments.
section_bench_layers_before() {
  (cd "$BEFORE" && PYTHONPATH="$PWD" python3 benchmarks/bench_layers.py --out "$OUT/before/layers" \
    --budget-s 270 ${BENCH_ARGS:-} ${BENCH_LAYERS_ARGS:-})
}

section_bench_optimizer_before() {
  (cd "$BEFORE" && PYTHONPATH="$PWD" python3 benchmarks/bench_optimizer.py \
    --out "$OUT/before/optimizer" --budget-s 200 ${BENCH_ARGS:-} ${BENCH_OPTIMIZER_ARGS:-})
}

section_launch_before() {
  (cd "$BEFORE" && PYTHONPATH="$PWD" python3 scripts/host_overhead_gpu.py)
}

section_compile_time_before() {
  # this tree's benchmark module, the earlier tree's package (its compile_layers)
  (cd "$BEFORE" && PYTHONPATH="$PWD:$OLDPWD" python3 -m benchmarks.compile_time --layers "${COMPILE_LAYERS:-4,32}" \
    --out "$OUT/before/compile_time" --tag before ${BENCH_ARGS:-})
}

section_profile() {
  # host vs GPU time of one FP8 linear fwd+bwd, kernel breakdowns of the linear and of one decoder layer
  python3 -m scripts.profile_linear_gpu --no-checks
  python3 -m scripts.profile_layer_gpu --recipes bf16,coat --cprofile --top 25
}

# --------------------------------------------------------------------------------------------------------------

t_all=$SECONDS
if compgen -G ".carry/wheels/*.whl" > /dev/null; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/wheels/*.whl; then
    export PYTHONPATH="/tmp/site:$PWD"
  else
    echo "wheel install failed; continuing without them"
    export PYTHONPATH="$PWD"
  fi
else
  export PYTHONPATH="$PWD"
fi
echo "PYTHONPATH=$PYTHONPATH (install took $((SECONDS - t_all))s)"

summary=()
failed=0
for entry in "${SECTIONS[@]}"; do
  read -r name limit <<< "$entry"
  override="LIMIT_${name^^}"  # e.g. LIMIT_PYTEST_GPU=400 raises one section's limit
  limit="${!override:-$limit}"
  echo "=== [$name] (limit ${limit}s) ==="
  t0=$SECONDS
  # the function runs in a child bash so that `timeout` can stop it and everything it started
  timeout -k 15 "$limit" bash -c "$(declare -f "section_$name"); set -o pipefail; section_$name" 2>&1 \
    | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  status="ok"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMEOUT"; elif [ "$rc" -ne 0 ]; then status="FAILED"; fi
  [ "$status" = "ok" ] || failed=$((failed + 1))
  summary+=("$(printf '%-18s %-8s rc=%-4s %4ss' "$name" "$status" "$rc" "$((SECONDS - t0))")")
  # a benchmark's JSON (saved after every run, so also after a time-out) gets the run's name
  for bench in optimizer layers; do
    if [ "$name" = "bench_$bench" ] && [ -f "$RESULTS/$bench/bench_$bench.json" ]; then
      mv "$RESULTS/$bench/bench_$bench.json" "$RESULTS/$bench/$RUN_ID.json"
    fi
  done
done

{
  echo "=== summary (total $((SECONDS - t_all))s) ==="
  printf '%s\n' "${summary[@]}"
} | tee "$OUT/summary.txt"
[ "$failed" -eq 0 ]
