"""Run `mmpretrain train` in subprocesses (plain or under torchrun) for end-to-end tests."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from mmpretrain.logging.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
               "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_NTASKS", "OMPI_COMM_WORLD_RANK")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without launcher variables, CPU threads pinned low."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               WANDB_SILENT="true", PYTHONPATH=str(REPO), **extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(overrides: list[str], config: str = "experiments/tiny_synthetic.yaml",
              nproc: int = 1) -> list[str]:
    """The command line of a training run, under torchrun when `nproc` > 1."""
    entry = ["-m", "mmpretrain.cli", "train", "--config", config, *overrides]
    if nproc == 1:
        return [sys.executable, *entry]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *entry]


def run_train(overrides: list[str], config: str = "experiments/tiny_synthetic.yaml",
              nproc: int = 1, timeout: float = 600, check: bool = True,
              **env: str) -> subprocess.CompletedProcess:
    """Run a training job to completion; on failure show its output."""
    proc = subprocess.run(train_cmd(overrides, config, nproc), cwd=REPO, env=clean_env(**env),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def run_check(name: str, out: Path, *args: str, nproc: int = 1,
              script: str = "engine_checks.py") -> dict:
    """Run check `name` of a `tests/*_checks.py` script in a fresh process (under torchrun when
    `nproc` > 1) and return the JSON it prints on its `RESULT` line."""
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_port", str(free_port())]
    proc = subprocess.run([*launcher, str(REPO / "tests" / script), name,
                           str(out), *args], cwd=REPO, env=clean_env(), capture_output=True,
                          text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def losses(run_dir: Path) -> dict[int, float]:
    """{step: loss} from a run's metrics.jsonl."""
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}


def gpu_losses_agree(tmp_path: Path, a: list[str], b: list[str], steps: int = 20,
                     rel: float = 1e-3) -> None:
    """Train the tiny model on one GPU in bf16 (the plain attention, a loss logged every
    step) with overrides `a`, then `b`; assert both log every step and the losses agree
    within `rel` (relative, absolute below 1)."""
    traces = []
    for i, extra in enumerate((a, b)):
        run_train([f"output_dir={tmp_path}", f"name=run{i}", f"optim.steps={steps}",
                   "engine.device=cuda", "engine.precision=bf16", "model.attention=reference",
                   "checkpoint.every=0", "logging.log_every=1", "logging.wandb_mode=disabled",
                   *extra])
        traces.append(losses(tmp_path / f"run{i}"))
    first, second = traces
    assert sorted(first) == sorted(second) and len(first) == steps, traces
    for step, loss in second.items():
        assert abs(first[step] - loss) <= rel * max(1.0, abs(loss)), (step, traces)
