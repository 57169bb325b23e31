#!/usr/bin/env bash
# Train with torchrun instead of accelerate launch (same trainer; Accelerate reads torchrun's env).
#
#   launch/torchrun.sh CONFIG.yaml [--set k=v ...] [--run-dir DIR]
#   NPROC_PER_NODE=8 launch/torchrun.sh configs/imagenet/r34_r18_kd.yaml            # one node
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node1 launch/torchrun.sh configs/imagenet/...   # on node1
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node1 launch/torchrun.sh configs/imagenet/...   # on node2
#
# Environment: NNODES (1), NODE_RANK (0), NPROC_PER_NODE (GPUs on this node, else 1: on a CPU
# machine set it, e.g. 2, for gloo processes), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500),
# PYTHON (.venv/bin/python if present, else python3).
# Signals: SIGTERM and SIGUSR1 are forwarded to the training processes, which checkpoint and stop
# (re-run the same command to resume). torchrun itself then exits 1, not the trainer's 75: under
# Slurm use launch/slurm/train.sbatch, which keeps that status and requeues.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 CONFIG.yaml [launch/train.py options]" >&2
    exit 2
fi
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${PYTHON:-}" ]; then
    py=$PYTHON
elif [ -x "$root/.venv/bin/python" ]; then
    py=$root/.venv/bin/python
else
    py=python3
fi
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$("$py" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
cfg=$1
shift

exec "$py" -m torch.distributed.run \
    --nnodes "${NNODES:-1}" \
    --node-rank "${NODE_RANK:-0}" \
    --nproc-per-node "$NPROC_PER_NODE" \
    --master-addr "${MASTER_ADDR:-127.0.0.1}" \
    --master-port "${MASTER_PORT:-29500}" \
    --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout "${SHUTDOWN_TIMEOUT_S:-120}" \
    "$root/launch/train.py" --cfg "$cfg" "$@"
