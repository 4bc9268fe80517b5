#!/usr/bin/env bash
# Distributed training on one machine: tools/dist_train.sh CONFIG NUM_PROCESSES [args...]
# (torchrun + mmengine's pytorch launcher; gloo on CPU, nccl on GPUs).
set -euo pipefail
CONFIG=$1
NPROC=$2
PORT=${PORT:-29500}
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m torch.distributed.run --nproc_per_node="$NPROC" --master_port="$PORT" \
  tools/train.py "$CONFIG" --launcher pytorch "${@:3}"
