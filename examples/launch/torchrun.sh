#!/usr/bin/env bash
# Multi-node fit with torchrun. Run the same command on every node; only NODE_RANK differs.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node-0 bash examples/launch/torchrun.sh \
#       examples/cogvideox_5b_diffusion_dpo.yaml examples/strategies/zero3.yaml [--trainer.max_steps 500 ...]
#
# Each node starts GPUS_PER_NODE processes; Lightning reads the ranks torchrun sets, and the DataModule gives
# every process of every node its own shards. Extra arguments go to `lightning-pref fit`.
set -euo pipefail

CONFIG=${1:?usage: torchrun.sh RUN_CONFIG STRATEGY_PRESET [fit options...]}
STRATEGY=${2:?usage: torchrun.sh RUN_CONFIG STRATEGY_PRESET [fit options...]}
shift 2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

exec torchrun \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m lightning_pref.cli fit --config "$CONFIG" --config "$STRATEGY" \
    --trainer.num_nodes "$NNODES" --trainer.devices "$GPUS_PER_NODE" "$@"
