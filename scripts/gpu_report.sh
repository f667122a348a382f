#!/usr/bin/env bash
# The GPU measurements behind the closing notes, on the lent H100 (device tool), in parts that each fit
# one 10-minute call (back to back: part 3 uses part 2's cost model when the machine is still the same).
# Outputs land in $OUT (or outputs/gpu_report).
#   0: GPU tests (~5 min with autotuning)
#   1: the kernel benchmark's decode rows (M = 1, 4, 16; ~7 min with gemlite installed)
#   1p: where a captured decode call's GPU time goes, kernel by kernel (M = 1, 16; ~2.5 min)
#   1b: the rest of the kernel benchmark (M = 64, 256, 4096, energy, router, paced calls; ~6 min)
#   2: expert cost model re-profiled with these kernels
#   3: h100_stress: router static/ttha x ttt always/budget x 3 seeds (pretrains its model first)
#   4: the stressors' own effect
# Needs the wheel folder .whl (../shared/device/wheelhouse.sh) carried along.
set -uo pipefail
part="${1:?usage: gpu_report.sh 0|1|1p|1b|2|3|4}"
case "$part" in  # before installing anything
  0|1|1p|1b|2|3|4) ;;
  *) echo "part must be 0, 1, 1p, 1b, 2, 3 or 4 (got '$part')" >&2; exit 2 ;;
esac
OUT="${OUT:-outputs/gpu_report}"; mkdir -p "$OUT"
source scripts/device_setup.sh || exit 1
export PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1
nvidia-smi --query-gpu=name,power.draw,power.limit,temperature.gpu,clocks.sm --format=csv,noheader
log() { echo "== $* ($(date +%T))"; }
case "$part" in
0)
  log "GPU tests"
  timeout 560 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt" ;;
1)  # the decode rows of the kernel table (bench.csv/json hold them too)
  log "kernel bench, decode"
  timeout 560 python3 -m ttha.kernels.bench --only linear --ms 1,4,16 --out "$OUT/bench_decode" 2>&1 \
    | grep -v "^\s*$" | tail -120 ;;
1p)
  log "kernel bench, decode profile"
  timeout 560 python3 -m ttha.kernels.bench --only profile --ms 1,16 --out "$OUT/bench_profile" 2>&1 \
    | grep -v "^\s*$" | tail -30 ;;
1b)
  log "kernel bench, M >= 64, energy, router, paced calls"
  timeout 560 python3 -m ttha.kernels.bench --only linear,energy,router,launch --ms 64,256,4096 --out "$OUT/bench_rest" \
    2>&1 | grep -v "^\s*$" | tail -150 ;;
2)  # expert cost model with these kernels; the other ops carried over from the shipped file (~2 min)
  timeout 400 python3 profile_kernels.py \
    "ops=[expert_16bit,expert_fp8,expert_int4,expert_int2,expert_int4_torch,expert_int2_torch]" \
    base=ttha/resources/cost_model_h100.json energy.window_s=0.5 repeats=30 tracking.enabled=false \
    2>&1 | grep -v "it/s\]" | tail -60
  cp outputs/cost_models/*.json outputs/cost_models/*.png "$OUT/" 2>/dev/null ;;
3)  # the h100_stress comparison after pretraining its model (~1.5 min); seed outermost, so a timeout
    # loses the fewest whole seeds (~6 min)
  log "pretrain"
  timeout 180 python3 train.py experiment=h100_stress stress=none test.n_batches=5 tracking.experiment=h100_pretrain \
    2>&1 | grep -E "pretrain|perplexity" | tail -3
  log "comparison"
  timeout 420 python3 train.py -m experiment=h100_stress seed=0,1,2 router=static,ttha ttt=always,budget \
    2>&1 | grep -vE "it/s\]|batch/s\]|step/s\]" > "$OUT/stress_runs.log"
  grep -E "TTHA run|eval/|overhead/" "$OUT/stress_runs.log" | tail -12
  python3 -m ttha.report --experiment h100_stress --csv "$OUT/h100_stress.csv" | tee "$OUT/h100_stress.md"
  python3 -m ttha.report --experiment h100_stress \
    --metrics overhead/telemetry_frac,overhead/logging_frac,overhead/ttha_update_frac,overhead/ttha_host_frac,overhead/router_bias_frac | tee "$OUT/overhead.md" ;;
4)  # what each stressor adds on its own (~1.5 min)
  timeout 150 python3 -m ttha.stress --measure matmul bursty thermal_ramp --seconds 10 --json "$OUT/stress.json" ;;
esac
