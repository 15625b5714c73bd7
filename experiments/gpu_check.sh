#!/usr/bin/env bash
# The checks that need a GPU, each part with its own time limit so a slow part cannot starve the
# rest; logs and the demo's report go to OUT_DIR:
#   tests             the model, sampler and loss tests on the GPU (parity with transformers'
#                     float32, which runs on the CPU)
#   bench_train_step  the SFT-step benchmark, ours and transformers both on the GPU
#   bench_sampler     the sampler benchmark, ours and transformers `generate` both on the GPU
#   demo              the demo pipeline end to end (SFT, cache, GRPO, evaluation)
#   grpo              three GRPO steps of a quickly SFT'd tiny model with the accelerator settings
#                     (bf16 compute, remat, scanned layers, a KL reference): seconds per phase,
#                     step 1 (which compiles each program) against steps 2-3; a table, a JSON line
#
#     experiments/gpu_check.sh [OUT_DIR [PART...]]     # all parts: about 18 minutes on an H200
#     GRPO_SFT_STEPS=30 experiments/gpu_check.sh OUT_DIR grpo   # the grpo part, a shorter SFT
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

# The grpo part: SFT the tiny model on procedural trajectories made here (as the demo makes its
# own inputs), then GRPO from its export with the pod's model settings and beta > 0, so step 1
# compiles every program a GRPO step runs: the weight move, the sampler's prefill and decode, the
# reference log-prob pass and the update. "compile s" = step 1 - the mean of steps 2-3: near 0
# (either sign) for host-side phases; sampling's also moves with the rollouts' lengths. The
# evaluation before step 1 compiles the weight move and the sampler at the evaluation's shapes,
# so its seconds are reported too.
grpo_part() {
  local run=$out/grpo_run
  local cli=("$python" -m cacherl_jax.cli)
  rm -rf "$run" "$out/grpo_metrics.jsonl"
  mkdir -p "$run"
  part grpo_data 60 "${cli[@]}" tasks --split train --n 64 --output "$run/train.jsonl"
  part grpo_sft 180 "${cli[@]}" sft --config=configs/sft.py:tiny \
    --config.data.train="$run/train.jsonl" --config.train.steps="${GRPO_SFT_STEPS:-150}" \
    --config.train.checkpoint_every=1000 --workdir="$run/sft" --noprogress
  part grpo 240 "${cli[@]}" grpo --config=configs/grpo.py:tiny \
    --config.model.checkpoint="$run/sft/hf" --config.model.compute_dtype=bfloat16 \
    --config.model.remat=True --config.model.unroll_layers=False --config.grpo.beta=0.04 \
    --config.tasks.source=jsonl --config.tasks.path="$run/train.jsonl" \
    --config.cache.build_from="$run/train.jsonl" --config.eval_tasks.n=4 \
    --config.train.steps=3 --config.train.log_every=1 --config.train.eval_every=0 \
    --config.train.checkpoint_every=1000 --config.train.export_hf=False \
    --workdir="$run/grpo" --noprogress
  cp "$run/grpo/metrics.jsonl" "$out/grpo_metrics.jsonl" 2>/dev/null || true
  rm -rf "$run"
  "$python" - "$out/grpo_metrics.jsonl" <<'PY' 2>&1 | tee "$out/grpo_summary.txt"
import json
import sys

import jax

try:
    with open(sys.argv[1]) as f:
        records = [json.loads(line) for line in f if line.strip()]
except OSError:
    sys.exit("no GRPO metrics: see grpo.log")
steps = {}  # a step's training and evaluation metrics are separate lines
for record in records:
    steps.setdefault(record["step"], {}).update(record)
if not all("time/update_s" in steps.get(s, {}) for s in (1, 2, 3)):
    sys.exit(f"GRPO logged steps {sorted(steps)}, not 1-3: see grpo.log")
phases = sorted({k for s in (1, 2, 3) for k in steps[s] if k.startswith("time/")})
rows = {}
print(f"{'phase':<14}{'step 1 s':>10}{'steps 2-3 s':>13}{'compile s':>11}")
for key in [*phases, "total"]:
    keys = phases if key == "total" else [key]
    first = sum(steps[1][k] for k in keys)
    rest = sum(steps[s][k] for s in (2, 3) for k in keys) / 2
    name = key.removeprefix("time/").removesuffix("_s")
    print(f"{name:<14}{first:>10.3f}{rest:>13.3f}{first - rest:>11.3f}")
    rows[name] = {"step1_s": round(first, 4), "steps23_s": round(rest, 4),
                  "compile_s": round(first - rest, 4)}
before = steps.get(0, {}).get("eval/seconds")
if before is not None:
    print(f"evaluation before step 1 (compiles the weight move, the sampler at its shapes): "
          f"{before:.1f} s")
device = jax.devices()[0]
print(json.dumps({"part": "grpo", "device": device.device_kind, "jax": jax.__version__,
                  "eval_before_s": before and round(before, 4), "phases": rows}))
PY
}

parts=("${@:2}")
[ ${#parts[@]} -gt 0 ] || parts=(tests bench_train_step bench_sampler demo grpo)
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
    grpo) grpo_part ;;
    *) echo "unknown part $name (tests, bench_train_step, bench_sampler, demo, grpo)"; exit 2 ;;
  esac
done
