"""Launcher detection (`detect_env`) and Slurm node-list expansion, from explicit env dicts."""
from __future__ import annotations

import os
import socket

import pytest

from mmpretrain.engine import dist as mdist
from mmpretrain.engine.dist import DistEnv, detect_env, expand_nodelist


# ---- expand_nodelist ---------------------------------------------------------------------------
@pytest.mark.parametrize("nodelist, hosts", [
    ("node01", ["node01"]),
    ("node[01-03,07],gpu-a[1-2]", ["node01", "node02", "node03", "node07", "gpu-a1", "gpu-a2"]),
    ("n[008-011]", ["n008", "n009", "n010", "n011"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("a,b,c", ["a", "b", "c"]),
    ("rack1-[1-2]-ib", ["rack1-1-ib", "rack1-2-ib"]),
    ("gpu[3]", ["gpu3"]),
    ("n[1,3,5]", ["n1", "n3", "n5"]),
    ("head,n[1-2],tail", ["head", "n1", "n2", "tail"]),
    ("", []),
])
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


def test_expand_nodelist_multiple_bracket_groups() -> None:
    assert expand_nodelist("r[1-2]n[1-2]") == ["r1n1", "r1n2", "r2n1", "r2n2"]


def test_expand_nodelist_multiple_bracket_groups_in_list() -> None:
    assert expand_nodelist("rack[1-2]-node[01-02],login") == [
        "rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02", "login"]


# ---- detect_env: RANK/WORLD_SIZE launchers -----------------------------------------------------
def test_torchrun() -> None:
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29511", "TORCHELASTIC_RUN_ID": "abc",
           "GROUP_RANK": "1"}
    assert detect_env(env) == DistEnv(3, 1, 8, "10.0.0.5", 29511, "torchrun")


def test_deepspeed_launcher() -> None:
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "6", "MASTER_ADDR": "node7",
           "MASTER_PORT": "29600", "CROSS_RANK": "2", "CROSS_SIZE": "3", "LOCAL_SIZE": "2"}
    assert detect_env(env) == DistEnv(5, 1, 6, "node7", 29600, "deepspeed/env")


def test_accelerate_launcher() -> None:
    # `accelerate launch` goes through torch elastic, so TORCHELASTIC_RUN_ID is set as well:
    # the ACCELERATE_* variables must still win.
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29502", "TORCHELASTIC_RUN_ID": "none",
           "ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_USE_DEEPSPEED": "true",
           "ACCELERATE_DYNAMO_BACKEND": "NO"}
    assert detect_env(env) == DistEnv(1, 1, 2, "127.0.0.1", 29502, "accelerate")


def test_accelerate_detected_by_any_accelerate_var() -> None:
    env = {"RANK": "0", "WORLD_SIZE": "1", "ACCELERATE_USE_CPU": "true"}
    assert detect_env(env).source == "accelerate"


def test_rank_env_defaults() -> None:
    """RANK + WORLD_SIZE alone: local rank 0, localhost:29500."""
    assert detect_env({"RANK": "2", "WORLD_SIZE": "4"}) == DistEnv(
        2, 0, 4, "127.0.0.1", 29500, "deepspeed/env")


def test_rank_without_world_size_is_not_a_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mdist, "free_port", lambda: 41234)
    assert detect_env({"RANK": "2"}) == DistEnv(0, 0, 1, "127.0.0.1", 41234,
                                                "none (single process)")


def test_rank_vars_win_over_slurm_and_mpi() -> None:
    """torchrun started inside an srun/mpirun allocation: torchrun's variables describe us."""
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1",
           "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": "7",
           "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1"}
    denv = detect_env(env)
    assert (denv.rank, denv.local_rank, denv.world_size, denv.source) == (1, 1, 2, "torchrun")


# ---- detect_env: Open MPI ------------------------------------------------------------------------
def test_openmpi() -> None:
    env = {"OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
           "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
           "MASTER_ADDR": "mpi-head", "MASTER_PORT": "23456"}
    assert detect_env(env) == DistEnv(6, 2, 8, "mpi-head", 23456, "openmpi")


def test_openmpi_defaults() -> None:
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}
    assert detect_env(env) == DistEnv(1, 0, 2, "127.0.0.1", 29500, "openmpi")


def test_openmpi_wins_over_slurm() -> None:
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_SIZE": "4", "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
           "SLURM_JOB_NODELIST": "x1", "SLURM_JOB_ID": "1"}
    denv = detect_env(env)
    assert (denv.rank, denv.world_size, denv.source) == (1, 4, "openmpi")


# ---- detect_env: Slurm srun ----------------------------------------------------------------------
SLURM = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
         "SLURM_JOB_NODELIST": "gpu[003-004,010],cpu1", "SLURM_JOB_ID": "123456"}


def test_slurm_srun() -> None:
    denv = detect_env(SLURM)
    assert denv == DistEnv(5, 1, 8, "gpu003", 20000 + 123456 % 20000, "slurm")
    assert denv.master_port == 23456


def test_slurm_port_is_the_same_on_every_rank_and_differs_between_jobs() -> None:
    ports = {detect_env({**SLURM, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r % 2)}).master_port
             for r in range(8)}
    assert len(ports) == 1
    other = detect_env({**SLURM, "SLURM_JOB_ID": "123457"}).master_port
    assert other != ports.pop()
    for job in (0, 19999, 20000, 39999, 10**9 + 7):
        port = detect_env({**SLURM, "SLURM_JOB_ID": str(job)}).master_port
        assert 1024 < port < 65536


def test_slurm_master_port_env_wins() -> None:
    denv = detect_env({**SLURM, "MASTER_PORT": "31000"})
    assert denv.master_port == 31000 and denv.master_addr == "gpu003"


def test_slurm_master_addr_env_wins() -> None:
    assert detect_env({**SLURM, "MASTER_ADDR": "10.1.2.3"}).master_addr == "10.1.2.3"


def test_slurm_step_nodelist_preferred() -> None:
    """Inside a job step that uses a subset of the allocation, the step's nodes are the ones."""
    denv = detect_env({**SLURM, "SLURM_STEP_NODELIST": "gpu[004,010]"})
    assert denv.master_addr == "gpu004"


def test_slurm_first_host_of_single_node() -> None:
    env = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1",
           "SLURM_JOB_NODELIST": "node01", "SLURM_JOB_ID": "42"}
    assert detect_env(env) == DistEnv(0, 0, 1, "node01", 20042, "slurm")


def test_slurm_needs_ntasks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mdist, "free_port", lambda: 40001)
    env = {k: v for k, v in SLURM.items() if k != "SLURM_NTASKS"}
    assert detect_env(env).source == "none (single process)"


# ---- detect_env: no launcher ---------------------------------------------------------------------
def test_no_launcher_uses_a_free_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mdist, "free_port", lambda: 45678)
    assert detect_env({"PATH": "/usr/bin", "HOME": "/root"}) == DistEnv(
        0, 0, 1, "127.0.0.1", 45678, "none (single process)")


def test_no_launcher_real_free_port() -> None:
    denv = detect_env({})
    assert (denv.rank, denv.local_rank, denv.world_size) == (0, 0, 1)
    assert 0 < denv.master_port < 65536
    with socket.socket() as s:  # nobody holds it
        s.bind(("127.0.0.1", denv.master_port))


def test_no_launcher_respects_master_vars() -> None:
    env = {"MASTER_ADDR": "10.9.8.7", "MASTER_PORT": "29999"}
    assert detect_env(env) == DistEnv(0, 0, 1, "10.9.8.7", 29999, "none (single process)")


def test_empty_master_port_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mdist, "free_port", lambda: 45679)
    assert detect_env({"MASTER_PORT": ""}).master_port == 45679


def test_free_port_is_bindable() -> None:
    port = mdist.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key in list(os.environ):
        if key.startswith("ACCELERATE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert detect_env() == DistEnv(1, 0, 3, "127.0.0.1", 29500, "deepspeed/env")
