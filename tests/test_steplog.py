"""Log lines read one step late: `engine/steplog.py`'s window and the trainer's lines."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from helpers import run_check, run_train
from mmpretrain.engine.steplog import LogValues, LossWindow
from mmpretrain.logging.metrics import read_jsonl


def _add(window: LossWindow, loss: float, contrastive: float) -> None:
    window.add({"loss": torch.tensor(loss), "contrastive_loss": torch.tensor(contrastive)})


def test_window_means_its_steps_and_starts_over() -> None:
    w = LossWindow(world=1)
    for loss in (1.0, 2.0, 6.0):
        _add(w, loss, loss / 2)
    w.close(3, torch.tensor(2.5), {"lr": 0.1})
    assert w.sums == {} and w.steps == 0  # the next window starts empty
    assert w.take() == LogValues(3, {"contrastive_loss": 1.5, "loss": 3.0}, 2.5, {"lr": 0.1})
    assert w.take() is None
    _add(w, 4.0, 1.0)
    w.close(4, None, {})
    got = w.take()
    assert got is not None and got.losses == {"contrastive_loss": 1.0, "loss": 4.0}
    assert math.isnan(got.grad_norm)  # no norm known


@pytest.mark.parametrize("norm, expected", [(0.0, 0.0), (3.0, 3.0), (torch.tensor([1.25]), 1.25)])
def test_window_takes_host_grad_norms(norm: float | torch.Tensor, expected: float) -> None:
    w = LossWindow(world=1)
    _add(w, 1.0, 1.0)
    w.close(1, norm, {})
    assert w.take().grad_norm == expected


def test_window_refuses_a_second_line_before_the_first_is_taken() -> None:
    w = LossWindow(world=1)
    _add(w, 1.0, 1.0)
    w.close(10, None, {})
    _add(w, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="step 10"):
        w.close(11, None, {})


def test_lines_written_late_hold_each_windows_mean(tmp_path: Path) -> None:
    """One run logging every step, one every 2 steps (the same seed and data): each line of the
    second holds the mean of the first's losses over its window, the same lr and grad norm;
    lines are written after the next step, the last one at once."""
    common = [f"output_dir={tmp_path}", "optim.steps=5", "checkpoint.every=0",
              "logging.wandb_mode=disabled", "engine.zero_stage=1"]
    run_train([*common, "name=every1", "logging.log_every=1"])
    run_train([*common, "name=every2", "logging.log_every=2"])
    one = {r["step"]: r for r in read_jsonl(tmp_path / "every1" / "metrics.jsonl") if "loss" in r}
    two = {r["step"]: r for r in read_jsonl(tmp_path / "every2" / "metrics.jsonl")}
    assert list(two) == [2, 4, 5]
    for step, window in ((2, (1, 2)), (4, (3, 4)), (5, (5,))):
        for key in ("loss", "contrastive_loss"):
            mean = sum(one[s][key] for s in window) / len(window)
            assert two[step][key] == pytest.approx(mean, rel=1e-6), (step, key)
        assert two[step]["lr"] == one[step]["lr"]
        assert two[step]["grad_norm"] == pytest.approx(one[step]["grad_norm"], rel=1e-6)
        assert two[step]["samples_seen"] == one[step]["samples_seen"]


def test_the_step_a_stop_signal_ends_keeps_its_line(tmp_path: Path) -> None:
    """A stop signal during step 5 (read a step late) ends the run at step 7 with a checkpoint;
    the line step 7 queued is written after the loop, so a resumed run's lines have no gap."""
    r = run_check("stop_line", tmp_path, script="loop_checks.py")
    assert r["status"] == "preempted" and r["step"] == 7 and r["saved"], r
    assert r["logged"] == list(range(1, 8)), r


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_taking_a_line_leaves_the_next_step_queued() -> None:
    """The log step's numbers are read after the next step is queued and wait for the log
    step only: the next step's work (a ~0.5 s spin) still runs when `take` returns. Reading
    them with `.tolist()` (as until 2026-12-02) would wait for the spin too."""
    cuda = torch.device("cuda")
    w = LossWindow(world=1)
    w.add({"loss": torch.full((), 2.0, device=cuda)})
    w.close(1, torch.full((), 0.5, device=cuda), {})
    torch.cuda._sleep(1_000_000_000)  # the next step's work
    got = w.take()
    still_queued = not torch.cuda.current_stream().query()
    assert got == LogValues(1, {"loss": 2.0}, 0.5, {})
    assert still_queued
