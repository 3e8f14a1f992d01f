#!/usr/bin/env bash
# One call benchmarks the zoo on a GPU machine: environment, then tools/benchmark.py for each
# workload below (at its defaults: bf16 for the at-scale ones), each in its own process under
# its own timeout, then one table.
#
#   bash tools/gpu_bench.sh                  # on the lent H200 (carry .whl: see
#                                            #   tools/prepare_gpu_wheels.sh); about 5-7 minutes
#   BENCH_QUICK=1 bash tools/gpu_bench.sh    # the tiny *_T_Synthetic list: checks this script
#                                            #   end to end on a CPU
#
# Writes to $OUT (./bench_out when unset): results.json (every result, failures included, as a
# list), table.md (the Markdown table, also printed last), bench.log (everything, environment
# first), and for each workload marked --profile its trace (trace_NN.json.gz, the first four)
# with the summaries of all in profiles.md (tools/profile_summary.py). At most 8 files: the
# device tool brings back no more.
#
# Environment knobs:
#   BENCH_WORKLOADS  ';'-separated "EXP [KNOB=VALUE ...] [env:NAME=VALUE ...] [--profile]"
#                    entries replacing the default list (env: set for that workload alone;
#                    --profile: 3 more steps traced after the timed ones)
#   BENCH_CHECKS     1: tools/gpu_checks.py and launch.py end to end first (default); attention:
#                    gpu_checks.py alone; 0: none
#   BENCH_SET        knobs set on every workload (default none)
#   BENCH_STEPS, BENCH_WARMUP     timed and warm-up steps (default 10 and 2; quick: 3 and 1)
#   BENCH_BUDGET_S   seconds for the whole script (default 480); workloads that no longer fit
#                    are recorded as skipped
#   BENCH_RUN_TIMEOUT_S  limit of one workload (default 150)
#   PYTHON           interpreter (default python3, or .venv/bin/python where python3 has no jax)
# A failed, timed-out or skipped workload is a row of the table; the script always exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS

OUT=${OUT:-./bench_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/bench.log
RUNS=$(mktemp -d "${TMPDIR:-/tmp}/bench_runs.XXXXXX")
: > "$LOG"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3

say() { echo "$*" | tee -a "$LOG"; }

# ------------------------------------------------------------------ interpreter and wheels ------
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import jax' 2>/dev/null && [ -x .venv/bin/python ]; then
  PYTHON=.venv/bin/python
fi
if ! "$PYTHON" -c 'import fiddle' 2>/dev/null; then
  if compgen -G '.whl/*.whl' >/dev/null; then
    say "== installing carried wheels: $(cd .whl && ls *.whl | tr '\n' ' ')"
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >>"$LOG" 2>&1; then
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
      say "!! wheel install failed (see bench.log); continuing"
    fi
  else
    say "!! fiddle missing and no .whl/*.whl carried: run tools/prepare_gpu_wheels.sh here and carry .whl"
  fi
fi

# ------------------------------------------------------------------ environment -----------------
{
  echo "== $(date -u +%FT%TZ) on $(hostname), python: $PYTHON"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
  else
    echo "(no nvidia-smi)"
  fi
  "$PYTHON" - <<'EOF'
import importlib.metadata as md, platform
import jax
print('python', platform.python_version())
jax.print_environment_info()
print('devices:', jax.devices())
for name in ('jax', 'jaxlib', 'jax-cuda13-plugin', 'jax-cuda12-plugin', 'flax', 'optax',
             'orbax-checkpoint', 'fiddle', 'libcst', 'tensorboard', 'numpy'):
  try:
    print(f'  {name}=={md.version(name)}')
  except md.PackageNotFoundError:
    pass
EOF
} 2>&1 | tee -a "$LOG"

# ------------------------------------------------------------------ correctness on the device --
CHECKS=${BENCH_CHECKS:-1}
if [ "$CHECKS" = 1 ] || [ "$CHECKS" = attention ]; then
  say "== tools/gpu_checks.py (fused attention vs einsum, KV-cache decoding)"
  timeout -k 5 120 "$PYTHON" tools/gpu_checks.py 2>&1 | grep -v '^I[0-9]' | tee -a "$LOG"
fi
if [ "$CHECKS" = 1 ]; then
  say "== launch.py end to end: DiT_T_Synthetic 20 steps, then resumed to 30"
  E2E=$(mktemp -d "${TMPDIR:-/tmp}/e2e.XXXXXX")
  for n in 20 30; do
    timeout -k 5 150 "$PYTHON" launch.py --exp=DiT_T_Synthetic --workdir="$E2E" \
        --set NUM_STEPS=$n --set LOG_EVERY=10 >>"$LOG" 2>&1
    say "   launch.py NUM_STEPS=$n: rc $? $(grep -ho 'Resuming from step [0-9]*' "$LOG" | tail -n 1)"
  done
  say "   checkpoints: $(ls "$E2E/checkpoints" | tr '\n' ' ')"
fi

# ------------------------------------------------------------------ workloads -------------------
if [ -n "${BENCH_WORKLOADS:-}" ]; then
  IFS=';' read -r -a WORKLOADS <<<"$BENCH_WORKLOADS"
  STEPS=${BENCH_STEPS:-10}; WARMUP=${BENCH_WARMUP:-2}
elif [ "${BENCH_QUICK:-0}" = 1 ]; then
  WORKLOADS=(
    "DiT_T_Synthetic ATTENTION_IMPL=einsum"
    "DiT_T_Synthetic ATTENTION_IMPL=xla"
    "ViT_T_Synthetic --profile"
    "GPT_T_Synthetic"
    "GPT_T_Synthetic REMAT=full SCAN_LAYERS=False"
    "NoSuchExperiment"              # a failure must become a row, not stop the script
  )
  STEPS=${BENCH_STEPS:-3}; WARMUP=${BENCH_WARMUP:-1}
else
  # Most wanted first: what does not fit the budget is skipped from the end.
  WORKLOADS=(
    # the issue's targets at the defaults (bf16, ATTENTION_IMPL=auto: cuDNN here, blocks
    # unrolled), each profiled (profiles.md, trace_NN.json.gz) ...
    "DiT_XL_Synthetic GLOBAL_BATCH=256 --profile"
    "ViT_B_Synthetic --profile"
    "GPT_B_Synthetic --profile"
    # ... then each fast path off, one at a time, the short ones first (XLA's attention is
    # what 'auto' ran before 2026-12-04, and for ViT-B's odd 197 tokens until cuDNN's padding
    # mask took them; the scan OOMed DiT-XL at batch 256 that day, so it is tried on ViT-B), a
    # 16-bit residual stream (the DiT's conversions around the float32 one), and XLA's Triton
    # GEMMs off (cuBLAS for every matmul)
    "ViT_B_Synthetic ATTENTION_IMPL=xla"
    "GPT_B_Synthetic ATTENTION_IMPL=xla"
    "DiT_XL_Synthetic GLOBAL_BATCH=256 RESIDUAL_DTYPE=bfloat16"
    "ViT_B_Synthetic SCAN_LAYERS=True"
    "GPT_B_Synthetic LOSS_CHUNK=128"
    "GPT_B_Synthetic env:XLA_FLAGS=--xla_gpu_enable_triton_gemm=false"
    "ViT_B_Synthetic env:XLA_FLAGS=--xla_gpu_enable_triton_gemm=false"
    "GPT_B_Synthetic FUSED_QKV=True"
    "DiT_XL_Synthetic GLOBAL_BATCH=256 ATTENTION_IMPL=xla"
    "DiT_XL_Synthetic GLOBAL_BATCH=256 FUSED_QKV=True"
    "GPT_B_Synthetic GLOBAL_BATCH=64"
    # the latent DiT's VAE: encoding in the step vs pre-encoded latents (docs/PERFORMANCE.md),
    # with random weights of the SD VAE's architecture (none are on the device)
    "DiT_B_ImageNet256 GLOBAL_BATCH=32 --random_vae"
    "DiT_B_ImageNet256 GLOBAL_BATCH=32 LATENTS_DIR=stored --random_vae"
  )
  STEPS=${BENCH_STEPS:-10}; WARMUP=${BENCH_WARMUP:-2}
fi
read -r -a COMMON <<<"${BENCH_SET-}"
BUDGET=${BENCH_BUDGET_S:-480}
PER_RUN=${BENCH_RUN_TIMEOUT_S:-150}

# A result for a workload that left none (killed, crashed, skipped): experiment, overrides, error.
stub() {  # stub FILE ERROR EXP [KNOB=VALUE ...]
  local file=$1; shift
  "$PYTHON" -c 'import json, sys
print(json.dumps({"experiment": sys.argv[2], "overrides": sys.argv[3:], "error": sys.argv[1]}))' \
    "$@" >"$file"
}

say "== ${#WORKLOADS[@]} workloads, $WARMUP warm-up + $STEPS timed steps each, common: ${COMMON[*]:-none}, budget ${BUDGET}s"
i=0
for entry in "${WORKLOADS[@]}"; do
  i=$((i + 1))
  read -r -a words <<<"$entry"
  [ ${#words[@]} -eq 0 ] && continue
  exp=${words[0]}
  sets=("${COMMON[@]}" "${words[@]:1}")
  args=()
  envs=()
  profile=
  for kv in "${sets[@]}"; do  # KNOB=VALUE, a flag of benchmark.py itself (--random_vae), or
                              # env:NAME=VALUE, set in this workload's environment only
    if [[ $kv == --profile ]]; then
      profile=$(printf '%s/prof_%02d' "$RUNS" "$i"); args+=(--profile "$profile")
    elif [[ $kv == env:* ]]; then envs+=("${kv#env:}")
    elif [[ $kv == --* ]]; then args+=("$kv"); else args+=(--set "$kv"); fi
  done
  result=$(printf '%s/%02d.json' "$RUNS" "$i")
  left=$((BUDGET - (SECONDS - START)))
  limit=$(( left < PER_RUN ? left : PER_RUN ))
  if [ "$limit" -lt $(( PER_RUN < 30 ? PER_RUN : 30 )) ]; then
    say "-- [$i] $exp ${sets[*]}: skipped (${left}s of the budget left)"
    stub "$result" "skipped: time budget (BENCH_BUDGET_S=$BUDGET) spent" "$exp" "${sets[@]}"
    continue
  fi
  say "-- [$i] $exp ${sets[*]} (limit ${limit}s)"
  t0=$SECONDS
  env "${envs[@]}" timeout -k 10 "$limit" "$PYTHON" tools/benchmark.py --exp="$exp" \
      "${args[@]}" --steps "$STEPS" --warmup "$WARMUP" --out "$result" >>"$LOG" 2>&1
  rc=$?
  if [ ${#envs[@]} -gt 0 ] && [ -s "$result" ]; then  # the row says what ran: env tokens too
    "$PYTHON" -c 'import json, sys
path, extra = sys.argv[1], sys.argv[2:]
result = json.load(open(path))
result["overrides"] = list(result.get("overrides") or []) + extra
json.dump(result, open(path, "w"), indent=2)' "$result" "${envs[@]}"
  fi
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    stub "$result" "timed out after ${limit}s" "$exp" "${sets[@]}"
  elif [ ! -s "$result" ]; then
    stub "$result" "exited with status $rc and no result (see bench.log)" "$exp" "${sets[@]}"
  fi
  say "   $("$PYTHON" tools/benchmark.py --summarize "$result" | tail -n 1) ($((SECONDS - t0))s, rc $rc)"
  if [ -n "$profile" ]; then
    trace=$(find "$profile" -name '*perfetto_trace.json.gz' 2>/dev/null | head -n 1)
    if [ -n "$trace" ]; then
      { echo "## [$i] $exp ${sets[*]}"; echo
        "$PYTHON" tools/profile_summary.py "$trace" --top 30 2>&1; echo; } >>"$OUT/profiles.md"
      copied=$(ls "$OUT"/trace_*.json.gz 2>/dev/null | wc -l)
      [ "$copied" -lt 4 ] && cp "$trace" "$(printf '%s/trace_%02d.json.gz' "$OUT" "$i")"
    else
      echo "## [$i] $exp ${sets[*]}: no trace written" >>"$OUT/profiles.md"
    fi
  fi
done

# ------------------------------------------------------------------ results ---------------------
"$PYTHON" - "$RUNS" "$OUT/results.json" <<'EOF'
import glob, json, os, sys
runs, out = sys.argv[1], sys.argv[2]
results = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(runs, '*.json')))]
json.dump(results, open(out, 'w'), indent=2)
EOF
"$PYTHON" tools/benchmark.py --summarize "$OUT/results.json" >"$OUT/table.md"
rm -rf "$RUNS"
if [ -s "$OUT/profiles.md" ]; then  # the kinds of each profile; the kernels are in the file
  { echo; echo "== profiles (kernels listed in profiles.md)"
    grep -v '^| `\|^| kernel \|^| --- | ---: | ---: | ---: |' "$OUT/profiles.md" | cat -s; } | tee -a "$LOG"
fi
{
  echo
  echo "== done in $((SECONDS - START))s; $OUT/{results.json,table.md,bench.log}"
  echo "Compare rows of this run only: the machine is shared and step times drift between runs."
  cat "$OUT/table.md"
} | tee -a "$LOG"
exit 0
