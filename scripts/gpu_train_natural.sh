#!/usr/bin/env bash
# The one prepared run for a lent GPU machine, in one call:
# 1. continue the bundled `natural` prior for MINUTES minutes of training (configs/train/natural_gpu.yaml: bf16,
#    batch 16 of 256x256 patches, from diffpir/assets/priors/natural.safetensors) and export the EMA weights to
#    $OUT/natural.safetensors, with the training log beside it;
# 2. GPU timings (bench/gpu_timings.py: s/image of the natural prior at 256 px and 100 NFEs, batch 1 and 16; a
#    forward of the ffhq_10m-size UNet at 256 px; training img/s) to $OUT/gpu_timings.json (TIMINGS=0 skips them).
# MINUTES 6 + about 2 minutes of timings fit one 10-minute command of the `device` tool with start-up to spare.
# Run of 2026-12-01 (one H200, 566 s): bench/results/gpu/2026-12-01_h200/. The timings are measured now, so a later
# lease can skip them and train longer from the bundled weights (that run's, fine-tuned on the CPU since): TIMINGS=0 MINUTES=8.
#
#   bash scripts/gpu_train_natural.sh                       # any CUDA machine with torch and lightning
#   MINUTES=1 DRY_RUN=1 bash scripts/gpu_train_natural.sh --trainer.accelerator cpu --trainer.precision 32-true \
#       --data.batch_size 8 --data.num_workers 0          # a dry run of the script on a CPU (tiny timings)
#
# With this workplace's `device` tool: carry ["data/natural", ".whl"]. data/natural comes from
# `python scripts/prepare_data.py natural` (about 40 MB, 54 + 3 photos). The GPU image has no jsonargparse (LightningCLI needs it): put
# its wheels in .whl/ first (`pip download --no-deps -d .whl jsonargparse docstring-parser typeshed-client`,
# with `echo /.whl/ >> .git/info/exclude`). Extra arguments go to `diffpir-train fit`. Then copy the returned file
# to diffpir/assets/priors/natural.safetensors, and rerun bench/prior_quality.py and `make demo` here.
set -euo pipefail
MINUTES=${MINUTES:-6}
OUT=${OUT:-runs/natural_gpu/out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if ! "$PY" -c "import jsonargparse, docstring_parser, typeshed_client" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
(nvidia-smi -L || true) | tee "$OUT/train.log"
rm -f runs/natural_gpu/checkpoints/last.ckpt  # a fresh run from the bundled weights, never a stale checkpoint
"$PY" -m diffpir.cli.train fit --config configs/train/natural_gpu.yaml \
  --trainer.max_time "00:00:$(printf %02d "$MINUTES"):00" "$@" 2>&1 | tee -a "$OUT/train.log"
"$PY" -m diffpir.cli.train export --ckpt runs/natural_gpu/checkpoints/last.ckpt \
  --out "$OUT/natural.safetensors" --fp16 | tee -a "$OUT/train.log"
if [ "${TIMINGS:-1}" = 1 ]; then
  if [ "${DRY_RUN:-0}" = 1 ]; then
    "$PY" bench/gpu_timings.py --device cpu --nfe 2 --size 32 --batches 1 --train-batch 2 --train-size 32 --forward-size 32 \
      --forward-batches 1 --repeats 1 --skip forward --out "$OUT" 2>&1 | tee -a "$OUT/timings.log"
  else
    "$PY" bench/gpu_timings.py --compile --out "$OUT" 2>&1 | tee -a "$OUT/timings.log"
  fi
fi
