#!/usr/bin/env bash
# llave-ds on one node through the DeepSpeed launcher: one rank per GPU.
#
#   launch/deepspeed_single_node.sh CONFIG.yaml [key.sub=value ...]
#   NUM_GPUS=8 launch/deepspeed_single_node.sh configs/llave_2b.yaml run_dir=runs/llave_2b
#   LLAVE_DS_CPU=1 NUM_GPUS=2 launch/deepspeed_single_node.sh configs/demo_cpu.yaml \
#       model.path=demo_out/tiny_model data.source=demo_out/data/train data.image_root=demo_out/data
#
# It runs exactly this (the plain command, if you prefer to type it):
#   deepspeed --num_gpus 8 --master_port 29500 --no_local_rank --module llave_ds.train \
#       --config configs/llave_2b.yaml run_dir=runs/llave_2b
# --module: run llave_ds.train as `python -m`; --no_local_rank: the trainer reads LOCAL_RANK
# from the environment (the launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
# and takes no --local_rank argument.
#
# Environment variables (all optional):
#   NUM_GPUS          ranks to start (default: every GPU DeepSpeed sees; with LLAVE_DS_CPU=1: 2)
#   MASTER_PORT       rendezvous port (default: a free port, so two runs on one machine do not collide)
#   LLAVE_DS_CPU=1    CPU ranks over gloo: DS_ACCELERATOR=cpu, no CUDA devices, OMP_NUM_THREADS=1
#   LLAVE_DS_PYTHON   python with llave_ds and deepspeed (default: <repo>/.venv/bin/python if present,
#                     else python3)
# Checkpoint-and-stop by hand: `kill -USR1` the rank processes (not the launcher); the
# trainer finishes the step, checkpoints, exits with code 3; rerun the same command to resume.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 CONFIG.yaml [key.sub=value ...]" >&2
    exit 2
fi
CONFIG=$1
shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${LLAVE_DS_PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then LLAVE_DS_PYTHON=$ROOT/.venv/bin/python; else LLAVE_DS_PYTHON=python3; fi
fi

export TOKENIZERS_PARALLELISM=false
if [ "${LLAVE_DS_CPU:-0}" = 1 ]; then
    export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    NUM_GPUS=${NUM_GPUS:-2}
fi
# torchrun-style variables from an enclosing launcher would confuse the new ranks.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE

MASTER_PORT=${MASTER_PORT:-$("$LLAVE_DS_PYTHON" -c \
    'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
GPU_ARGS=()
[ -n "${NUM_GPUS:-}" ] && GPU_ARGS=(--num_gpus "$NUM_GPUS")

set -x
exec "$LLAVE_DS_PYTHON" -m deepspeed.launcher.runner "${GPU_ARGS[@]}" --master_port "$MASTER_PORT" \
    --no_local_rank --module llave_ds.train --config "$CONFIG" "$@"
