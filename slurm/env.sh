# Sourced by slurm/train.sbatch on the batch host; srun passes the environment to every task.
# Edit for your cluster (module loads, venv, network interfaces). Values already set win.

# Python environment: PYTHON (default python3). Activate a venv here if you use one, e.g.
#   source /path/to/venv/bin/activate
export PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# Threads per rank: the CPUs Slurm gave each task (default 1 when not set).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# NCCL (GPU nodes). Errors surface as exceptions instead of hangs; a rank that stalls in a
# collective is aborted after the timeout so the job fails fast and can be requeued.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_NCCL_BLOCKING_WAIT=${TORCH_NCCL_BLOCKING_WAIT:-0}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# InfiniBand / RoCE: leave unset to let NCCL choose; set when it picks the wrong device, e.g.
#   export NCCL_IB_HCA=mlx5_0,mlx5_1      export NCCL_SOCKET_IFNAME=ib0 (or ^lo,docker)
# On clusters without InfiniBand:          export NCCL_IB_DISABLE=1
# GPUDirect RDMA across nodes (if supported): export NCCL_NET_GDR_LEVEL=PHB
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
# Gloo (CPU runs) uses the interface of MASTER_ADDR unless told otherwise:
#   export GLOO_SOCKET_IFNAME=eth0
