#!/usr/bin/env bash
# The GPU measurements of issue 3 in one command, for a lent device machine (the
# workplace's `device` tool: one H200, Python 3.12 with PyTorch, no internet, a few
# minutes of device time). Prepare first, here:
#     python benchmarks/device_bundle.py --data ../shared/data/bbbc010
# then: run(command="bash benchmarks/device_run.sh", carry=[".device"], timeout_s=600)
#
# Order: the full training of the shipped config first (the target: <= 10 minutes on one
# H100/H200; stopped cleanly after FULL_MINUTES, the whole run then estimated from the
# epochs done), then prediction of one 520 x 696 image, then tests/test_cuda.py when time
# is left. Everything lands in $OUT: gpu_check.json (rewritten after each step),
# gpu_check.log, and the run's weights, metadata and log (full_best.safetensors,
# full_best.json, full_log.csv) to evaluate on the CPU afterwards:
#     napari-instseg evaluate --model full_best.safetensors --gt ../shared/data/bbbc010 \
#         --wells A11-A12,B11-B12,C01-C02,B13-B24 --tta 8 --tune --write
# (a model from train has no segmentation parameters of its own: untuned, the session-32
# GPU run scored AP 0.028, tuned 0.717), then eval_bbbc010.py --model as for any model.
# Dry run on a CPU: DEVICE=cpu EPOCH_STEPS=1 FULL_MINUTES=1 bash benchmarks/device_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_out}
DEVICE=${DEVICE:-cuda}
FULL_MINUTES=${FULL_MINUTES:-8.5}
STOP_AFTER=${STOP_AFTER:-540}
EPOCH_STEPS=${EPOCH_STEPS:-0}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .device/wheels ] && [ "${SKIP_WHEELS:-0}" != 1 ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/device_site .device/wheels/*.whl || exit 1
  export PYTHONPATH="$PWD:/tmp/device_site${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
DATA=${DATA:-.device/data/bbbc010}
[ -d "$DATA/images" ] || { echo "no data at $DATA: run benchmarks/device_bundle.py first"; exit 1; }
"$PYTHON" benchmarks/gpu_check.py --data "$DATA" --device "$DEVICE" --order full,predict,tests \
  --full-time-limit "$FULL_MINUTES" --stop-after "$STOP_AFTER" --epoch-steps "$EPOCH_STEPS" \
  --work /tmp/device_work --keep "$OUT" --out "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"
