"""Every launcher script starts a real 2-rank CPU run: the deepspeed launcher (one node, and two
"nodes" on localhost through pdsh + a real sshd, and without ssh), torchrun with two "nodes" (static and c10d rendezvous) and
`accelerate launch`. Plus unit tests of the hostfile helpers the Slurm template uses."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import sys
from pathlib import Path

import pytest

from helpers import REPO, clean_env, free_port
from mmpretrain.engine.hostfile import hostfile_text, main as hostfile_main, parse_hostfile
from mmpretrain.engine.hostfile import slots_per_node

TRAIN_ARGS = ["--config", "experiments/tiny_synthetic.yaml", "logging.wandb_mode=disabled",
              "data.batch_size=8", "optim.steps=4"]
BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    env = clean_env(PYTHON=sys.executable, **extra)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _run_nodes(cmds: list[tuple[list[str], dict[str, str]]],
               timeout: float = 400) -> list[subprocess.CompletedProcess]:
    """Start every (command, env) at once (the "nodes"), wait for all, fail with their output."""
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for cmd, env in cmds]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, f"{p.args} exited {p.returncode}:\n{out[-6000:]}"
    return [subprocess.CompletedProcess(p.args, p.returncode, out) for p, out in zip(procs, outs)]


def _check_run(run_dir: Path, output: str, source: str) -> None:
    """Both ranks trained 4 steps and wrote their checkpoint shards; the log names the launcher."""
    assert f"distributed: 2 rank(s) via {source}" in output, output[-4000:]
    summary = json.loads([ln for ln in output.splitlines() if ln.startswith('{"summary"')][-1])
    assert summary["summary"]["status"] == "finished" and summary["summary"]["step"] == 4
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records if "loss" in r) == 4
    step = run_dir / "checkpoints" / "step_00000004"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == step.name
    for rank in (0, 1):
        assert (step / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file(), rank


def _args(tmp_path: Path, name: str) -> list[str]:
    return [*TRAIN_ARGS, f"output_dir={tmp_path}", f"name={name}"]


# ---- unit tests ----------------------------------------------------------------------------
def test_hostfile_from_nodelist() -> None:
    text = hostfile_text("gpu[01-02,07],cpu-a1", 8)
    assert text == "gpu01 slots=8\ngpu02 slots=8\ngpu07 slots=8\ncpu-a1 slots=8\n"
    assert parse_hostfile(text) == {"gpu01": 8, "gpu02": 8, "gpu07": 8, "cpu-a1": 8}
    assert hostfile_text("r[1-2]n[1-2]", 1).split() == [
        "r1n1", "slots=1", "r1n2", "slots=1", "r2n1", "slots=1", "r2n2", "slots=1"]


def test_hostfile_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        hostfile_text("", 4)
    with pytest.raises(ValueError, match="slots"):
        hostfile_text("n1", 0)
    with pytest.raises(ValueError, match="bad hostfile line"):
        parse_hostfile("node1 slots=x\n")
    with pytest.raises(ValueError, match="twice"):
        parse_hostfile("a slots=1\na slots=2\n")
    assert parse_hostfile("# c\n\nnode1 slots=2  # trailing\n") == {"node1": 2}


def test_example_hostfile_parses() -> None:
    assert parse_hostfile((REPO / "launch" / "hostfile.example").read_text()) == {
        "node01": 8, "node02": 8}


@pytest.mark.parametrize("env,slots", [
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_NTASKS_PER_NODE": "8"}, 4),
    ({"SLURM_GPUS_PER_NODE": "gpu:a100:8"}, 8),
    ({"SLURM_NTASKS_PER_NODE": "2"}, 2),
    ({"SLURM_GPUS_ON_NODE": "0", "SLURM_NTASKS_PER_NODE": "3"}, 3),
    ({}, 1)])
def test_slots_per_node(env: dict, slots: int) -> None:
    assert slots_per_node(env) == slots


def test_hostfile_cli(capsys: pytest.CaptureFixture) -> None:
    assert hostfile_main(["n[1-2]", "2"]) == 0
    assert capsys.readouterr().out == "n1 slots=2\nn2 slots=2\n"
    assert hostfile_main([]) == 2


def test_cli_drops_deepspeed_local_rank() -> None:
    from mmpretrain.cli import _drop_local_rank

    assert _drop_local_rank(["--local_rank=1", "train", "--local-rank", "0", "a=1"]) == [
        "train", "a=1"]


# ---- real launches (2 ranks on CPU) ---------------------------------------------------------
@pytest.mark.slow
def test_deepspeed_launcher_single_node(tmp_path: Path) -> None:
    cmd = ["bash", "launch/deepspeed.sh", *_args(tmp_path, "ds")]
    out = _run_nodes([(cmd, _env(NUM_GPUS="2", MASTER_PORT=str(free_port())))])[0].stdout
    _check_run(tmp_path / "ds", out, "deepspeed/env")


@pytest.mark.slow
def test_deepspeed_launcher_two_nodes_without_ssh(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")  # two "nodes", one rank each
    port = str(free_port())
    cmds = [(["bash", "launch/deepspeed.sh", *_args(tmp_path, "dsn")],
             _env(HOSTFILE=str(hostfile), NO_SSH="1", NODE_RANK=str(rank),
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
            for rank in (0, 1)]
    _check_run(tmp_path / "dsn", _run_nodes(cmds)[0].stdout, "deepspeed/env")


@pytest.fixture
def sshd(tmp_path: Path):
    """A real sshd on 127.0.0.1 that accepts a throw-away key for root; stopped afterwards."""
    missing = [b for b in ("/usr/sbin/sshd", "ssh-keygen", "pdsh")
               if not (Path(b).exists() if b.startswith("/") else shutil.which(b))]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (.ci/run installs openssh-server pdsh)")
    if os.geteuid() != 0:
        pytest.skip("the test sshd logs in as root, so the test must run as root")
    d = tmp_path / "ssh"
    d.mkdir(mode=0o700)
    for name in ("key", "hostkey"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)],
                       check=True)
    shutil.copy(d / "key.pub", d / "authorized_keys")
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'hostkey'}\n"
        f"PidFile {d / 'sshd.pid'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PasswordAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\n"
        "UsePAM no\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    subprocess.run(["/usr/sbin/sshd", "-f", str(d / "sshd_config"), "-E", str(d / "log")],
                   check=True)
    for _ in range(50):
        if (d / "sshd.pid").is_file():
            break
        time.sleep(0.1)
    ssh_args = (f"-i {d / 'key'} -p {port} -o StrictHostKeyChecking=no "
                "-o UserKnownHostsFile=/dev/null -o BatchMode=yes")
    try:
        yield {"port": str(port), "args": ssh_args}
    finally:
        pid = (d / "sshd.pid").read_text().strip() if (d / "sshd.pid").is_file() else ""
        if pid:
            os.kill(int(pid), signal.SIGTERM)


@pytest.mark.slow
def test_deepspeed_launcher_two_nodes_over_ssh(tmp_path: Path, sshd: dict) -> None:
    """The hostfile mode: DeepSpeed's runner reaches both "nodes" with pdsh over ssh."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    env = _env(HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               SSH_PORT=sshd["port"], NO_SSH_CHECK="1", PDSH_RCMD_TYPE="ssh",
               PDSH_SSH_ARGS_APPEND=sshd["args"])
    out = _run_nodes([(["bash", "launch/deepspeed.sh", *_args(tmp_path, "dss")], env)])
    assert "pdsh -S" in out[0].stdout, out[0].stdout[-3000:]
    # pdsh prefixes every line with its host
    lines = [ln.split(": ", 1)[1] if ln.startswith(("localhost: ", "127.0.0.1: ")) else ln
             for ln in out[0].stdout.splitlines()]
    _check_run(tmp_path / "dss", "\n".join(lines), "deepspeed/env")


@pytest.mark.slow
@pytest.mark.parametrize("rdzv", ["static", "c10d"])
def test_torchrun_two_nodes(tmp_path: Path, rdzv: str) -> None:
    port = str(free_port())
    cmds = [(["bash", "launch/torchrun.sh", *_args(tmp_path, rdzv)],
             _env(NPROC="1", NNODES="2", NODE_RANK=str(rank), RDZV=rdzv, RDZV_ID=f"t{port}",
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=port)) for rank in (0, 1)]
    outs = _run_nodes(cmds)
    rank0 = [o.stdout for o in outs if "distributed: 2 rank(s)" in o.stdout]
    assert len(rank0) == 1, "exactly one node hosts rank 0"
    _check_run(tmp_path / rdzv, rank0[0], "torchrun")


@pytest.mark.slow
def test_accelerate_launch(tmp_path: Path) -> None:
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", "launch/accelerate.yaml",
           "--main_process_port", str(free_port()), "-m", "mmpretrain.cli", "train",
           *_args(tmp_path, "acc")]
    if not Path(cmd[0]).exists():
        pytest.skip(f"accelerate is not installed next to {sys.executable}")
    out = _run_nodes([(cmd, _env())])[0].stdout
    _check_run(tmp_path / "acc", out, "accelerate")


def test_submit_dry_run_fills_the_template() -> None:
    out = subprocess.run(
        ["bash", "slurm/submit.sh", "--dry-run", "--nodes", "3", "--gpus-per-node", "4",
         "--mode", "torchrun", "--time", "2:00:00", "--partition", "big",
         "--config", "experiments/clip_vit_b16.yaml", "optim.lr=5e-4", "name=a b"],
        cwd=REPO, capture_output=True, text=True, check=True).stdout
    header = [ln for ln in out.splitlines() if ln.startswith("#SBATCH ")]
    assert header == ["#SBATCH --job-name=clip_vit_b16", "#SBATCH --nodes=3",
                      "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                      "#SBATCH --cpus-per-task=8", "#SBATCH --time=2:00:00",
                      "#SBATCH --output=slurm-%x-%j.out", "#SBATCH --signal=B:USR1@120",
                      "#SBATCH --requeue", "#SBATCH --open-mode=append",
                      "#SBATCH --partition=big"]
    assert "export MODE=${MODE:-torchrun}" in out
    assert r"set -- --config experiments/clip_vit_b16.yaml optim.lr=5e-4 name=a\ b" in out
    assert "scontrol requeue" in out and out.startswith("#!/bin/bash")
    cpu = subprocess.run(["bash", "slurm/submit.sh", "--dry-run", "--gpus-per-node", "0"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    cpu_header = [ln for ln in cpu.splitlines() if ln.startswith("#SBATCH ")]
    assert "#SBATCH --ntasks-per-node=1" in cpu_header
    assert not any("gpus" in ln for ln in cpu_header)  # a CPU-only job requests no GPUs
    bad = subprocess.run(["bash", "slurm/submit.sh", "--dry-run", "--mode", "mpi"], cwd=REPO,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "bad --mode" in bad.stderr


def test_sbatch_scripts_parse() -> None:
    for script in ("slurm/train.sbatch", "slurm/node_launch.sh", "slurm/submit.sh",
                   "slurm/env.sh", "launch/torchrun.sh", "launch/deepspeed.sh"):
        subprocess.run(["bash", "-n", script], cwd=REPO, check=True)
