"""Rank, world size and rendezvous address from whatever launched us; process-group start-up.

Recognised launchers (first match wins): torchrun / deepspeed / accelerate (RANK, WORLD_SIZE,
LOCAL_RANK), Open MPI (OMPI_COMM_WORLD_*), Slurm's srun (SLURM_PROCID, SLURM_NTASKS, ...), and
none: a plain process becomes rank 0 of a 1-rank group on a free local port.
"""
from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass

import torch

log = logging.getLogger("mmpretrain.dist")


@dataclass
class DistEnv:
    """Where this process stands in the job."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm node list such as `node[01-03,07],gpu-a[1-2]` into host names."""
    parts, depth, cur = [], 0, ""
    for ch in nodelist:  # split on commas outside brackets
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [h for part in parts if part for h in _expand_host(part)]


def _expand_host(part: str) -> list[str]:
    """`r[1-2]n[01-02]` -> r1n01, r1n02, r2n01, r2n02 (every bracket group, zero padding kept)."""
    m = re.match(r"([^\[]*)\[([^\]]*)\](.*)", part)
    if not m:
        return [part]
    prefix, ranges, rest = m.groups()
    tails = _expand_host(rest)
    hosts = []
    for rng in ranges.split(","):
        lo, _, hi = rng.partition("-")
        nums = [lo] if not hi else [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
        hosts.extend(f"{prefix}{n}{t}" for n in nums for t in tails)
    return hosts


def free_port() -> int:
    """A TCP port that is free on this host right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_env(env: dict[str, str] | None = None) -> DistEnv:
    """Read the launcher's environment variables (see the module docstring for the order)."""
    env = dict(os.environ if env is None else env)
    port = int(env.get("MASTER_PORT", 0) or 0)
    addr = env.get("MASTER_ADDR", "")
    if "RANK" in env and "WORLD_SIZE" in env:
        source = "accelerate" if "ACCELERATE_MIXED_PRECISION" in env or any(
            k.startswith("ACCELERATE_") for k in env) else (
            "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed/env")
        return DistEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]),
                       addr or "127.0.0.1", port or 29500, source)
    if "OMPI_COMM_WORLD_RANK" in env:
        return DistEnv(int(env["OMPI_COMM_WORLD_RANK"]),
                       int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
                       int(env["OMPI_COMM_WORLD_SIZE"]), addr or "127.0.0.1", port or 29500,
                       "openmpi")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)),
                       int(env["SLURM_NTASKS"]), addr or (nodes[0] if nodes else "127.0.0.1"),
                       port or 20000 + job % 20000, "slurm")
    return DistEnv(0, 0, 1, addr or "127.0.0.1", port or free_port(), "none (single process)")


def resolve_device(requested: str, local_rank: int) -> torch.device:
    """`auto` -> this rank's CUDA device when CUDA is available, else CPU."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("engine.device=cuda but CUDA is not available on this machine")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(device_req: str = "auto", backend_req: str = "auto") -> tuple[DistEnv, torch.device]:
    """Start (or join) the process group through DeepSpeed and return (env, device)."""
    import deepspeed
    import torch.distributed as dist

    denv = detect_env()
    for key, value in (("RANK", denv.rank), ("LOCAL_RANK", denv.local_rank),
                       ("WORLD_SIZE", denv.world_size), ("MASTER_ADDR", denv.master_addr),
                       ("MASTER_PORT", denv.master_port)):
        os.environ[str(key)] = str(value)  # DeepSpeed reads these; without them it wants mpi4py
    device = resolve_device(device_req, denv.local_rank)
    backend = backend_req if backend_req != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu":
        # The shared-memory collective op JIT-compiles for ~30 s on first use and gives the same
        # results as plain gloo (measured), so skip it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   verbose=False)
    if denv.rank == 0:
        log.info("distributed: %d rank(s) via %s, backend %s, master %s:%d, device %s",
                 denv.world_size, denv.source, backend, denv.master_addr, denv.master_port,
                 device)
    return denv, device
