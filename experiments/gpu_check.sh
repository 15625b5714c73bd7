#!/usr/bin/env bash
# The checks that need a GPU, each part with its own time limit so a slow part cannot starve the
# rest; logs and the demo's report go to OUT_DIR:
#   tests             the model, sampler and loss tests on the GPU (parity with transformers'
#                     float32, which runs on the CPU)
#   bench_train_step  the SFT-step benchmark, ours and transformers both on the GPU
#   bench_sampler     the sampler benchmark, ours and transformers `generate` both on the GPU
#   demo              the demo pipeline end to end (SFT, cache, GRPO, evaluation)
#
#     experiments/gpu_check.sh [OUT_DIR [PART...]]     # all parts: about 15 minutes on an H200
#
# JAX multiplies float32 matrices in TF32 on NVIDIA GPUs unless told otherwise; the test suite and
# the `cacherl` commands ask for full float32 (docs/gpu.md, "float32 means float32").
set -u
out=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TQDM_MININTERVAL=30
# The benchmarks are scripts in experiments/: the package is imported from this checkout.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

part() {  # part NAME SECONDS COMMAND...: run with a limit, log to $out/NAME.log, print the tail
  local name=$1 seconds=$2
  shift 2
  echo "=== $name (limit ${seconds}s)"
  local start=$SECONDS
  timeout "$seconds" "$@" >"$out/$name.log" 2>&1
  echo "=== $name: rc=$? in $((SECONDS - start))s"
  tail -n 25 "$out/$name.log"
}

"$python" -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, torch.cuda.is_available())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

parts=("${@:2}")
[ ${#parts[@]} -gt 0 ] || parts=(tests bench_train_step bench_sampler demo)
for name in "${parts[@]}"; do
  case $name in
    tests) part tests 360 "$python" -m pytest -q -p no:cacheprovider --tb=short \
      tests/test_model.py tests/test_sampling.py tests/test_loss.py ;;
    bench_train_step) part bench_train_step 200 "$python" experiments/bench_train_step.py ;;
    bench_sampler) part bench_sampler 90 "$python" experiments/bench_sampler.py ;;
    demo)
      part demo 300 "$python" -m cacherl_jax.cli demo --workdir "$out/demo_run"
      cp "$out/demo_run/report.md" "$out/demo_report.md" 2>/dev/null || true
      rm -rf "$out/demo_run" ;;
    *) echo "unknown part $name (tests, bench_train_step, bench_sampler, demo)"; exit 2 ;;
  esac
done
