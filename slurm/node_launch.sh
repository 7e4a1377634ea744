#!/bin/bash
# Runs as a Slurm task (started by slurm/train.sbatch through srun): `node_launch.sh MODE ARGS`
# starts this task's share of the ranks. MODE=srun: this task IS one rank; torchrun / deepspeed:
# this task is the launcher for every rank on its node. ARGS follow `python`.
# USR1 is ignored here and inherited so launchers survive the preemption signal; the Python
# ranks install their own USR1/TERM handler (checkpoint at the next step, exit 0).
trap '' USR1
mode=$1; shift
case "$mode" in
  srun) exec "$PYTHON" "$@" ;;
  torchrun)
    exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$PER_NODE" \
      --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
      --rdzv_id "mmpretrain-$SLURM_JOB_ID" "$@" ;;
  deepspeed)
    exec "$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --no_ssh \
      --node_rank "$SLURM_NODEID" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
      --no_local_rank "$@" ;;
  *) echo "node_launch.sh: unknown MODE '$mode' (srun|torchrun|deepspeed)" >&2; exit 2 ;;
esac
