#!/usr/bin/env bash
# DP vs DP-AG on Push-T / Dynamic Push-T keypoints with the paper's full recipe, on a GPU machine.
#
# NOT RUN HERE: the published table in bench/PUSHT.md comes from the one-core CPU budget
# (bench/compare.py defaults). This script is the same driver with the paper's settings:
#   - configs/pusht_lowdim.yaml: the `lowdim` U-Net (down_dims 256/512/1024, kernel 5, 66 M params),
#     batch 256, AdamW lr 1e-4, cosine with 500 warm-up steps, EMA; DP's 200k-step schedule;
#   - 200 scripted-expert demonstrations per task (DP's human Push-T set has 206);
#   - 3 training seeds x {dp, dpag}; evaluation on DP's 50 test seeds (100000..100049) for
#     DP (dp sampling), DP-AG (dp sampling) and DP-AG (guided sampling), plus the expert ceiling.
# Training uses the GPU (train.device=auto); evaluation rollouts run on CPU worker processes.
# Expect roughly a day on one H100 for the 12 x 200k-step runs; run it under nohup/tmux, and
# run the same command again to continue: finished runs and evaluations are skipped, and a
# killed training run resumes from its last periodic checkpoint (save_every 10000).
#
#   bash bench/pusht_compare_gpu.sh                   # everything
#   OUT=outputs/pusht_gpu_50k STEPS=50000 SEEDS="0" bash bench/pusht_compare_gpu.sh   # a shorter look first
#   (runs are keyed by task/method/seed, not steps: give a different budget its own OUT)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STEPS=${STEPS:-200000}
SEEDS=${SEEDS:-"0 1 2"}
WORKERS=${WORKERS:-8}          # eval / generation processes (16 CPU cores on the lent H100 machine)
OUT=${OUT:-outputs/pusht_compare_gpu}
mkdir -p "$(dirname "$OUT")"
python bench/compare.py \
  --config configs/pusht_lowdim.yaml --recipe lowdim --steps "$STEPS" --batch-size 256 \
  --seeds $SEEDS --tasks pusht dynamic_pusht \
  --episodes 200 --eval-episodes 50 --workers "$WORKERS" --threads 1 --videos 2 \
  --out "$OUT" --table bench/compare/table_gpu.md --json bench/compare/results_gpu.json \
  "$@" 2>&1 | tee -a "$OUT.log"
