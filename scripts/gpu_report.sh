#!/usr/bin/env bash
# The GPU measurements behind the closing notes, on the lent H100 (device tool), in two parts that each
# fit one 10-minute call. Outputs land in $OUT (or outputs/gpu_report).
#   part 1: GPU kernel tests, kernel benchmark, expert cost model re-profiled with these kernels
#   part 2: train.py experiment=h100 (NVML + matmul stress), the h100_stress comparison over seeds,
#           the stressors' own power/temperature
# Needs the wheel folder .whl (../shared/device/wheelhouse.sh) carried along.
set -uo pipefail
part="${1:?usage: gpu_report.sh 1|2}"
OUT="${OUT:-outputs/gpu_report}"; mkdir -p "$OUT"
source scripts/device_setup.sh || exit 1
export PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1
nvidia-smi --query-gpu=name,power.draw,power.limit,temperature.gpu,clocks.sm --format=csv,noheader
log() { echo "== $* ($(date +%T))"; }
if [ "$part" = 1 ]; then
  log "GPU tests"
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
  log "kernel bench"
  timeout 260 python3 -m ttha.kernels.bench --out "$OUT" 2>&1 | grep -v "^\s*$" | tail -130
  log "profile experts"
  timeout 150 python3 profile_kernels.py \
    "ops=[expert_16bit,expert_fp8,expert_int4,expert_int2,expert_int4_torch,expert_int2_torch]" \
    base=ttha/resources/cost_model_h100.json energy.window_s=0.5 repeats=30 tracking.enabled=false \
    2>&1 | grep -v "it/s\]" | tail -40
  cp outputs/cost_models/*.json outputs/cost_models/*.png "$OUT/" 2>/dev/null
else
  log "train.py experiment=h100"
  timeout 200 python3 train.py experiment=h100 test.n_batches=300 2>&1 | grep -v "it/s\]\|batch/s\]" | tail -25
  log "h100_stress comparison"
  timeout 300 python3 train.py -m experiment=h100_stress router=static,ttha ttt=always,budget seed=0,1,2 \
    2>&1 | grep -E "TTHA run|eval/energy|eval/mean_power|Error|error" | tail -60
  python3 -m ttha.report --experiment h100_stress --csv "$OUT/h100_stress.csv" | tee "$OUT/h100_stress.md"
  log "stressor effect"
  timeout 60 python3 -m ttha.stress --measure matmul bursty thermal_ramp --seconds 8 --json "$OUT/stress.json"
fi
