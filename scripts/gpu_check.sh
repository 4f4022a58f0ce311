#!/usr/bin/env bash
# One prepared pass over the CUDA paths on a GPU machine (the project's CI has none):
#   1. the CUDA tests (tests/test_cuda.py) and the training / inference / budget suites with
#      train.device=auto picking the GPU,
#   2. the main job's recipe on real Fashion-MNIST on the GPU (bf16 + channels_last), sequential
#      and dynamic side by side (full training set, 3 epochs),
#   3. bench/gpu.py: train step, evaluation and torch.compile against sequential, same run.
# Results go to $OUT (default ./gpu_out), few files: gpu.json, pytest_gpu.log and gpu_check.tar.gz
# (versions, nvidia-smi, the runs' logs, final.json and metrics.jsonl).
# Needs Fashion-MNIST in ./data/fashion-mnist (or $DYNWIRE_DATA_DIR) and python3 with torch,
# torchvision, pytest, pytest-xdist, pyyaml, safetensors, networkx, tqdm, matplotlib.
#   bash scripts/gpu_check.sh            # about 5 minutes on one H200
#   bash scripts/gpu_check.sh --no-runs  # without the real-data runs
set -u
RUNS=1
[ "${1:-}" = "--no-runs" ] && RUNS=0
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
DATA=${DYNWIRE_DATA_DIR:-data/fashion-mnist}
T0=$(date +%s)
stamp() { echo "[gpu_check +$(($(date +%s) - T0))s] $*"; }

# the package itself (entry point `dynwire`, C kernels) without touching the machine's torch
"$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "editable install failed: PYTHONPATH only"
WORK=$(mktemp -d)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >"$WORK/nvidia_smi.csv" 2>&1
"$PY" -c "import torch, torchvision, sys; print(sys.version.split()[0], torch.__version__, torchvision.__version__, torch.version.cuda, torch.cuda.get_device_name())" | tee "$WORK/versions.txt"

runs=$WORK/runs
mkdir -p "$runs"
[ $RUNS = 1 ] && stamp "real-data runs (background)"
for w in $([ $RUNS = 1 ] && echo sequential dynamic); do
  timeout 230 "$PY" -c "import sys; from dynwire.cli import main; sys.exit(main(sys.argv[1:]))" \
    train --config fmnist_resnet20 --data-dir "$DATA" --output-dir "$runs" \
    --set model.wiring=$w data.subset=null data.val_subset=null schedule.epochs=3 \
    train.device=cuda train.amp=bf16 train.channels_last=true train.num_threads=null data.num_workers=2 \
    train.log_every=200 output.name=fmnist_resnet20_$w >"$WORK/run_$w.log" 2>&1 &
done

stamp "CUDA tests"
timeout 220 "$PY" -m pytest -q -n 6 -p no:cacheprovider tests/test_cuda.py tests/test_train.py tests/test_budget.py \
  >"$OUT/pytest_gpu.log" 2>&1
echo "pytest rc=$?" >>"$OUT/pytest_gpu.log"
tail -15 "$OUT/pytest_gpu.log"

stamp "waiting for the runs"
wait
for w in $([ $RUNS = 1 ] && echo sequential dynamic); do
  f=$runs/fmnist_resnet20_$w/final.json
  if [ -f "$f" ]; then cp "$f" "$WORK/final_$w.json"; cp "$runs/fmnist_resnet20_$w/metrics.jsonl" "$WORK/metrics_$w.jsonl"; fi
  tail -3 "$WORK/run_$w.log"
done

tar czf "$OUT/gpu_check.tar.gz" -C "$WORK" --exclude runs .

stamp "bench/gpu.py: eager"
timeout 170 "$PY" bench/gpu.py --rounds 5 --parts train eval --out "$OUT/gpu.json" 2>&1 | tail -32
stamp "bench/gpu.py: compile"
timeout 200 "$PY" bench/gpu.py --rounds 5 --parts compile --out "$OUT/gpu_compile.json" 2>&1 | tail -16
stamp "done"
