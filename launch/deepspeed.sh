#!/usr/bin/env bash
# Launch `mmpretrain train` with the `deepspeed` launcher. Every argument goes to
# `mmpretrain train`. DeepSpeed's `--local_rank=N` is not passed (LOCAL_RANK is in the env).
#
#   NUM_GPUS=8 launch/deepspeed.sh --config experiments/clip_vit_b16.yaml
#
# Environment (all optional):
#   NUM_GPUS     ranks per node (default: all GPUs; set it on CPU-only machines, e.g. 2)
#   HOSTFILE     a hostfile (see launch/hostfile.example) for several nodes; without one the
#                launcher runs on this machine only
#   NUM_NODES    use the first NUM_NODES hosts of HOSTFILE (default: all)
#   NO_SSH=1     no ssh/pdsh: run this script on EVERY node with NODE_RANK (its 0-based line in
#                HOSTFILE) and MASTER_ADDR (the first node); each starts only its own ranks
#   NODE_RANK    this node's index (NO_SSH only)
#   MASTER_ADDR  address of node 0 (NO_SSH, or to override what ssh would find)
#   MASTER_PORT  default 29500
#   SSH_PORT     sshd port on the nodes (ssh/pdsh mode; default 22)
#   NO_SSH_CHECK=1  skip DeepSpeed's password-less ssh probe (e.g. when the key is given only
#                through PDSH_SSH_ARGS_APPEND="-i KEY ...", which pdsh adds to every ssh call)
#   DEEPSPEED    the launcher command (default: `python3 -m deepspeed.launcher.runner`
#                with $PYTHON, so it runs in the same environment)
#
# Multi-node with ssh:    HOSTFILE=launch/hostfile launch/deepspeed.sh ...
# Multi-node without ssh: on node i: HOSTFILE=launch/hostfile NO_SSH=1 NODE_RANK=i \
#                           MASTER_ADDR=node01 launch/deepspeed.sh ...
set -euo pipefail
PYTHON=${PYTHON:-python3}
read -r -a launcher <<< "${DEEPSPEED:-$PYTHON -m deepspeed.launcher.runner}"
args=(--master_port "${MASTER_PORT:-29500}" --no_local_rank)
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num_gpus "$NUM_GPUS")
[[ -n "${NUM_NODES:-}" ]] && args+=(--num_nodes "$NUM_NODES")
if [[ -n "${HOSTFILE:-}" ]]; then
  [[ -f "$HOSTFILE" ]] || { echo "deepspeed.sh: no hostfile at $HOSTFILE" >&2; exit 2; }
  args+=(--hostfile "$HOSTFILE")
else
  args+=(--hostfile /dev/null/none)  # never pick up /job/hostfile by accident
fi
[[ -n "${MASTER_ADDR:-}" ]] && args+=(--master_addr "$MASTER_ADDR")
[[ -n "${SSH_PORT:-}" ]] && args+=(--ssh_port "$SSH_PORT")
[[ "${NO_SSH_CHECK:-0}" == 1 ]] && args+=(--no_ssh_check)
if [[ "${NO_SSH:-0}" == 1 ]]; then
  : "${NODE_RANK:?NO_SSH=1 needs NODE_RANK}" "${MASTER_ADDR:?NO_SSH=1 needs MASTER_ADDR}"
  [[ -n "${HOSTFILE:-}" ]] || { echo "deepspeed.sh: NO_SSH=1 needs HOSTFILE" >&2; exit 2; }
  args+=(--no_ssh --node_rank "$NODE_RANK")
fi
set -x
exec "${launcher[@]}" "${args[@]}" --module mmpretrain.cli train "$@"
