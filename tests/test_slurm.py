"""A real single-node Slurm cluster (slurm-wlm + munge, started in a temporary folder) runs
slurm/train.sbatch (via slurm/submit.sh) with 2 CPU ranks: one job trains and checkpoints;
another is preempted with USR1, checkpoints, requeues itself and resumes to the end."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, clean_env, free_port

pytestmark = pytest.mark.slow
DAEMONS = ("slurmctld", "slurmd", "munged", "mungekey")
MISSING = [d for d in DAEMONS if not shutil.which(d, path=os.environ.get("PATH", "") +
                                                  ":/usr/sbin:/sbin")]
TRAIN = ["--config", "experiments/tiny_synthetic.yaml", "logging.wandb_mode=disabled",
         "data.batch_size=8", "logging.log_every=1"]


def _sbin(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or name


def _slurm_conf(d: Path, host: str, sock: Path) -> str:
    """A CPU-only one-node cluster; the settings that matter are in DESIGN.md."""
    return f"""ClusterName=mmptest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={sock},cred_expire=5
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
MailProg=/bin/true
SchedulerParameters=bf_interval=1,sched_interval=1
ReturnToService=2
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
KillWait=30
NodeName={host} CPUs=2 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """munged + slurmctld + slurmd in a folder; `cmd()` runs a Slurm client against it."""

    def __init__(self, root: Path):
        self.root, self.host = root, socket.gethostname().split(".")[0]
        (root / "munge").mkdir(mode=0o711)
        (root / "munge").chmod(0o711)  # munged refuses a socket folder others can write to
        for sub in ("state", "spool"):
            (root / sub).mkdir()
        self.sock = root / "munge" / "munge.socket"
        self.conf = root / "slurm.conf"
        self.conf.write_text(_slurm_conf(root, self.host, self.sock))
        self.env = clean_env(SLURM_CONF=str(self.conf), PYTHON=sys.executable)
        self.munged_pid: int | None = None

    def cmd(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} failed: {proc.stdout}{proc.stderr}\n{self.logs()}")
        return proc.stdout

    def start(self) -> None:
        r = self.root
        self.cmd(_sbin("mungekey"), "-c", "-k", str(r / "munge.key"))
        self.cmd(_sbin("munged"), "-S", str(self.sock), "--key-file", str(r / "munge.key"),
                 "--pid-file", str(r / "munged.pid"), "--log-file", str(r / "munged.log"),
                 "--seed-file", str(r / "munged.seed"), "--force")
        self.munged_pid = int((r / "munged.pid").read_text())
        self.cmd(_sbin("slurmctld"), "-f", str(self.conf))
        self.cmd(_sbin("slurmd"), "-f", str(self.conf))
        deadline = time.time() + 60
        while time.time() < deadline:
            if "idle" in self.cmd("sinfo", "-h", "-o", "%T", check=False):
                return
            time.sleep(0.5)
        raise AssertionError(f"the node never became idle\n{self.logs()}")

    def stop(self) -> None:
        subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True, timeout=60)
        for name in ("slurmd", "slurmctld"):  # wait for both to go, then stop munged
            pid_file = self.root / f"{name}.pid"
            _wait_gone(int(pid_file.read_text()) if pid_file.is_file() else None)
        if self.munged_pid:
            os.kill(self.munged_pid, signal.SIGTERM)
            _wait_gone(self.munged_pid)

    def logs(self) -> str:
        return "".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in
                       sorted(self.root.glob("*.log")))


def _wait_gone(pid: int | None, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while pid and time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    if MISSING:
        pytest.skip(f"Slurm/munge not installed ({', '.join(MISSING)} not on PATH); "
                    "`.ci/run` installs them with `apt-get install slurm-wlm munge`")
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs slurmd as root (it starts jobs as any user)")
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _submit(c: Cluster, out: Path, name: str, steps: int, mode: str = "srun") -> str:
    job = c.cmd("bash", str(REPO / "slurm" / "submit.sh"), "--mode", mode, "--gpus-per-node", "0",
                "--ntasks-per-node", "2", "--cpus-per-task", "1", "--time", "10",
                "--output", str(out / f"{name}-%j.out"), *TRAIN, f"optim.steps={steps}",
                f"output_dir={out}", f"name={name}").strip()
    assert job.isdigit(), job
    return job


def _job_state(c: Cluster, job: str) -> tuple[str, int]:
    """(state, restart count) of a job while slurmctld remembers it."""
    fields = dict(kv.split("=", 1) for kv in c.cmd("scontrol", "-o", "show", "job", job).split()
                  if "=" in kv)
    return fields["JobState"], int(fields.get("Restarts", 0))


def _wait(c: Cluster, job: str, done, timeout: float, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if done():
            return
        time.sleep(0.5)
    text = log.read_text()[-6000:] if log and log.is_file() else ""
    raise AssertionError(f"job {job} timed out: {_job_state(c, job)}\n{text}\n{c.logs()}")


def _summary(log_text: str) -> list[dict]:
    return [json.loads(ln)["summary"] for ln in log_text.splitlines()
            if ln.startswith('{"summary"')]


def test_sbatch_trains_and_checkpoints(cluster: Cluster, tmp_path: Path) -> None:
    job = _submit(cluster, tmp_path, "plain", steps=4)
    _wait(cluster, job, lambda: _job_state(cluster, job)[0] in ("COMPLETED", "FAILED"), 150)
    text = (tmp_path / f"plain-{job}.out").read_text()
    assert _job_state(cluster, job) == ("COMPLETED", 0), text[-4000:]
    assert "distributed: 2 rank(s) via slurm" in text, text[-4000:]
    assert [s["status"] for s in _summary(text)] == ["finished"]
    ckpt = tmp_path / "plain" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000004"
    for rank in (0, 1):
        shard = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        assert (ckpt / "step_00000004" / shard).is_file()
    assert "requeue" not in text  # a finished job does not requeue


def _logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(ln).get("step", 0) for ln in path.read_text().splitlines() if ln.strip()]
    return max(steps, default=0)


def test_preempted_job_checkpoints_requeues_and_resumes(cluster: Cluster, tmp_path: Path) -> None:
    _preempt_and_resume(cluster, tmp_path, "srun")


@pytest.mark.skipif(os.environ.get("MMPRETRAIN_SLURM_ALL_MODES") != "1",
                    reason="set MMPRETRAIN_SLURM_ALL_MODES=1 (adds ~80 s per mode)")
@pytest.mark.parametrize("mode", ["torchrun", "deepspeed"])
def test_launcher_modes_preempt_and_resume(cluster: Cluster, tmp_path: Path, mode: str) -> None:
    """The per-node launchers ignore USR1; their ranks checkpoint and the job requeues."""
    _preempt_and_resume(cluster, tmp_path, mode)


def _preempt_and_resume(cluster: Cluster, tmp_path: Path, mode: str) -> None:
    steps, run_dir = 60, tmp_path / "pre"
    job = _submit(cluster, tmp_path, "pre", steps=steps, mode=mode)
    log = tmp_path / f"pre-{job}.out"
    _wait(cluster, job, lambda: _logged_step(run_dir) >= 3, 150, log)
    cluster.cmd("scancel", "--signal=USR1", "--batch", job)
    _wait(cluster, job, lambda: _job_state(cluster, job)[1] >= 1, 60, log)  # requeued
    _wait(cluster, job, lambda: _job_state(cluster, job)[0] in ("COMPLETED", "FAILED"), 200, log)
    text = log.read_text()
    assert _job_state(cluster, job) == ("COMPLETED", 1), text[-6000:]
    first, second = _summary(text)
    assert first["status"] == "preempted" and 3 <= first["step"] < steps, first
    assert second == {**second, "status": "finished", "step": steps}
    assert f"mode {mode} " in text and "caught SIGUSR1" in text
    assert f"requeueing job {job}" in text
    assert f"job {job} restart 1" in text
    assert f"resumed from {run_dir / 'checkpoints'}" in text
    assert f"at step {first['step']} " in text
    logged = [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "loss" in ln]
    assert sorted(set(logged)) == list(range(1, steps + 1))  # no step lost or repeated
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"
