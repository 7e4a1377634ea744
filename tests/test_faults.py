"""Fault tests: a rank killed with SIGKILL, a crash inside a checkpoint write, and the
preemption signals. After each, `resume: auto` continues with exactly the losses of an
uninterrupted run (CPU, fp32, 2 ranks, ZeRO-2)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import REPO, clean_env, losses, run_train, train_cmd

pytestmark = pytest.mark.slow
STEPS = 12
BASE = [f"optim.steps={STEPS}", "engine.zero_stage=2", "checkpoint.every=4",
        "logging.log_every=1", "logging.wandb_mode=disabled", "data.batch_size=16"]


def _args(tmp_path: Path, name: str) -> list[str]:
    return [f"output_dir={tmp_path}", f"name={name}", *BASE]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """The uninterrupted run's loss at every step."""
    out = tmp_path_factory.mktemp("ref")
    run_train(_args(out, "ref"), nproc=2)
    trace = losses(out / "ref")
    assert sorted(trace) == list(range(1, STEPS + 1))
    return trace


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{proc.stdout.read()[-4000:]}")
        if (run_dir / "metrics.jsonl").is_file() and max(losses(run_dir), default=0) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def _start(tmp_path: Path, name: str, nproc: int = 2, **env: str) -> subprocess.Popen:
    return subprocess.Popen(train_cmd(_args(tmp_path, name), nproc=nproc), cwd=REPO,
                            env=clean_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _resume_and_compare(tmp_path: Path, name: str, reference: dict[int, float],
                        from_step: int) -> None:
    out = run_train(_args(tmp_path, name), nproc=2)
    assert f"step_{from_step:08d} at step {from_step}" in out.stdout, out.stdout[-3000:]
    trace = losses(tmp_path / name)
    assert sorted(trace) == list(range(1, STEPS + 1))
    assert trace == reference  # every step, including those after the resume point


@pytest.mark.parametrize("stage", [1, 3])
def test_kill_9_other_zero_stages(tmp_path: Path, stage: int) -> None:
    """The same kill -9 / resume check under ZeRO-1 and ZeRO-3 (own reference run)."""
    extra = [f"engine.zero_stage={stage}", "optim.steps=8", "checkpoint.every=3"]
    run_train([*_args(tmp_path, "ref"), *extra], nproc=2)
    proc = subprocess.Popen(train_cmd([*_args(tmp_path, "killed"), *extra], nproc=2),
                            cwd=REPO, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait_for_step(tmp_path / "killed", 5, proc)
    os.kill(_children(proc.pid)[-1], signal.SIGKILL)
    assert proc.wait(timeout=300) != 0
    out = run_train([*_args(tmp_path, "killed"), *extra], nproc=2)
    assert "step_00000003 at step 3" in out.stdout, out.stdout[-3000:]
    assert losses(tmp_path / "killed") == losses(tmp_path / "ref")


def test_kill_9_one_rank_then_resume_exactly(tmp_path: Path, reference: dict) -> None:
    proc = _start(tmp_path, "killed")
    _wait_for_step(tmp_path / "killed", 6, proc)
    ranks = _children(proc.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[-1], signal.SIGKILL)
    assert proc.wait(timeout=300) != 0
    _resume_and_compare(tmp_path, "killed", reference, from_step=4)


def test_crash_during_checkpoint_write_keeps_previous(tmp_path: Path, reference: dict) -> None:
    proc = _start(tmp_path, "torn", MMPRETRAIN_FAILPOINT="checkpoint_before_rename:8")
    assert proc.wait(timeout=300) != 0
    ckpt = tmp_path / "torn" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000004"
    assert (ckpt / ".tmp-step_00000008").is_dir() and not (ckpt / "step_00000008").exists()
    _resume_and_compare(tmp_path, "torn", reference, from_step=4)
    assert not (ckpt / ".tmp-step_00000008").exists()  # the next save cleaned it up


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_signal_saves_and_exits_zero(tmp_path: Path, reference: dict,
                                                sig: signal.Signals) -> None:
    """The signal reaches one rank only; every rank saves within two steps (the stop flag is
    read a step late) and exits 0."""
    proc = _start(tmp_path, "preempted")
    _wait_for_step(tmp_path / "preempted", 5, proc)
    os.kill(_children(proc.pid)[0], sig)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-4000:]
    summary = json.loads([ln for ln in output.splitlines() if ln.startswith('{"summary"')][-1])
    stopped_at = summary["summary"]["step"]
    assert summary["summary"]["status"] == "preempted" and 5 <= stopped_at < STEPS
    ckpt = tmp_path / "preempted" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step_{stopped_at:08d}"
    _resume_and_compare(tmp_path, "preempted", reference, from_step=stopped_at)
