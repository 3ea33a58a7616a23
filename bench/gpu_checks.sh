#!/usr/bin/env bash
# The GPU figures of the pruning and diagnosis issues in one short run (a few minutes on an
# H100), for a machine with CUDA, torch and transformers (no services, no downloads):
#   bash bench/gpu_checks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# Wanda on a ~1.1B-parameter LLaMA-shaped random model, the papers' 128 x 2048 calibration:
# the model on the GPU, then kept in host memory with one block at a time on the GPU.
"$PYTHON" bench/wanda_large.py --device cuda --batch-tokens 8192
"$PYTHON" bench/wanda_large.py --device cuda --batch-tokens 8192 --placement cpu
# Hessian-vector product cost, Hutchinson trace and top eigenvalue of a ResNet-18 on the GPU.
"$PYTHON" bench/diagnose.py --device cuda --batch 128 --probes 100 --max-iter 100
# Spectral analysis of a LLaMA-7B-shaped checkpoint (random float16 weights, 13.5 GB on disk),
# streamed from its shards with same-shape matrices batched on the GPU: target < 60 s.
"$PYTHON" bench/spectral_7b.py --device cuda --dir "${TMPDIR:-/tmp}/tailwise-llama7b"
# FARMS on the GPU: the same checkpoint's first 4 blocks, 10 x 10 windows of 2000 x 2000 per matrix.
"$PYTHON" bench/spectral_7b.py --device cuda --dir "${TMPDIR:-/tmp}/tailwise-llama7b-4" --layers 4 --farms
