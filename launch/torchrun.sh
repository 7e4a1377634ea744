#!/usr/bin/env bash
# Launch `mmpretrain train` under torchrun. Every argument goes to `mmpretrain train`.
#
#   launch/torchrun.sh --config experiments/clip_vit_b16.yaml optim.lr=5e-4
#
# Environment (all optional):
#   NPROC        ranks on this node (default: the GPUs torch sees, or 1 without CUDA)
#   NNODES       number of nodes (default 1); with RDZV=c10d may be a range MIN:MAX
#   RDZV         static (default): every node passes NODE_RANK; c10d: nodes join a rendezvous
#                at MASTER_ADDR:MASTER_PORT (hosted by the first node to start there) and
#                torchrun assigns node ranks
#   NODE_RANK    this node's index, 0..NNODES-1 (static only; default 0)
#   MASTER_ADDR  address of node 0 / of the rendezvous host (default 127.0.0.1)
#   MASTER_PORT  its port (default 29500)
#   RDZV_ID      a job id shared by all nodes (c10d only; default mmpretrain)
#   PYTHON       interpreter (default python3)
#
# Two nodes, static:  on node A  NNODES=2 NODE_RANK=0 MASTER_ADDR=A launch/torchrun.sh ...
#                     on node B  NNODES=2 NODE_RANK=1 MASTER_ADDR=A launch/torchrun.sh ...
# Two nodes, c10d:    on both    NNODES=2 RDZV=c10d MASTER_ADDR=A RDZV_ID=run7 launch/torchrun.sh ...
set -euo pipefail
PYTHON=${PYTHON:-python3}
NNODES=${NNODES:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
args=(--nproc_per_node "$NPROC" --nnodes "$NNODES")
case "${RDZV:-static}" in
  static) args+=(--node_rank "${NODE_RANK:-0}" --master_addr "$MASTER_ADDR"
                 --master_port "$MASTER_PORT") ;;
  c10d)   args+=(--rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT"
                 --rdzv_id "${RDZV_ID:-mmpretrain}") ;;
  *) echo "torchrun.sh: RDZV must be static or c10d, got '$RDZV'" >&2; exit 2 ;;
esac
set -x
exec "$PYTHON" -m torch.distributed.run "${args[@]}" -m mmpretrain.cli train "$@"
