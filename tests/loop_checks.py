"""Training-loop checks that need a real DeepSpeed engine in a fresh process (non-finite steps,
stop signals, the log lines of both); run by tests/test_engine.py and tests/test_steplog.py.

    python tests/loop_checks.py nonfinite OUT_DIR   # skipped steps, the stop, their log lines
    python tests/loop_checks.py stop_line OUT_DIR   # the log line of the step a stop signal ends

Each prints one JSON line with its measurements.
"""
from __future__ import annotations

import json
import os
import sys

import torch

from engine_checks import _trainer


def _nan_from(trainer, bad_calls) -> None:
    """Make the loss NaN on the given forward calls (1-based) of the training task."""
    loss, calls = trainer.task.loss, {"n": 0}
    forward = loss.forward

    def patched(*args):
        calls["n"] += 1
        value = forward(*args)
        return value * float("nan") if bad_calls(calls["n"]) else value

    loss.forward = patched


def _param_snapshots(trainer) -> list[dict[str, torch.Tensor]]:
    snaps: list[dict[str, torch.Tensor]] = []
    eng, step = trainer.engine, trainer.engine.step

    def wrapped(*a, **k):
        out = step(*a, **k)
        snaps.append({n: p.detach().clone() for n, p in eng.module.named_parameters()})
        return out

    eng.step = wrapped
    return snaps


def _logged_skips(t) -> list[list[int]]:
    """[step, skipped_steps] of each training line in the run's metrics.jsonl."""
    from mmpretrain.logging.metrics import read_jsonl

    return [[r["step"], r["skipped_steps"]] for r in read_jsonl(t.run_dir / "metrics.jsonl")
            if "loss" in r]


def check_nonfinite(out: str) -> dict:
    from mmpretrain.engine.errors import NonFiniteTrainingError

    result = {}
    for stage, precision in ((0, "fp32"), (2, "fp32"), (1, "bf16"), (0, "bf16")):
        common = [f"engine.zero_stage={stage}", "optim.steps=7", "optim.max_skipped_steps=2",
                  "checkpoint.every=0", "data.batch_size=8", "optim.warmup_steps=1",
                  "logging.log_every=1", f"engine.precision={precision}"]
        stage = f"{stage}_{precision}"
        t = _trainer(out, f"one_nan_{stage}", *common)
        _nan_from(t, lambda n: n == 3)
        snaps = _param_snapshots(t)
        summary = t.train()
        same = all(torch.equal(snaps[1][k], snaps[2][k]) for k in snaps[1])
        moved = any(not torch.equal(snaps[2][k], snaps[3][k]) for k in snaps[2])
        finite = all(torch.isfinite(v).all() for v in snaps[-1].values())
        logged = {"one_nan": _logged_skips(t)}
        t = _trainer(out, f"all_nan_{stage}", *common)
        _nan_from(t, lambda n: n >= 3)
        try:
            t.train()
            stopped = None
        except NonFiniteTrainingError as e:
            stopped = str(e)
        logged["all_nan"] = _logged_skips(t)
        result[stage] = {"ds_overflow_check": getattr(t.optimizer, "check_grad_overflow", None),
                         "skipped": summary["skipped_steps"], "unchanged_on_skip": same,
                         "moved_after": moved, "finite": finite, "stopped": stopped,
                         "checkpoint": t.ckpt.has_step(t.step), "stop_step": t.step,
                         "logged": logged}
    return result


def check_stop_line(out: str) -> dict:
    """A stop signal arrives during step 5 of 12 (a line every step, no checkpoint step in
    between): the run saves and ends at the step that reads the flag, and every step up to it
    has its line, the last one included (queued at that step, written after the loop)."""
    from mmpretrain.logging.metrics import read_jsonl

    t = _trainer(out, "stop", "data.batch_size=8", "logging.log_every=1", "optim.steps=12",
                 "checkpoint.every=0", "eval.every=0")
    one_step = t._one_step

    def signalled(batches) -> None:
        one_step(batches)
        if t.step == 5:
            t._stop_signal = 10  # what SIGUSR1's handler records
    t._one_step = signalled
    summary = t.train()
    return {"status": summary["status"], "step": summary["step"],
            "saved": t.ckpt.has_step(summary["step"]),
            "logged": [r["step"] for r in read_jsonl(t.run_dir / "metrics.jsonl")]}


if __name__ == "__main__":
    from mmpretrain.engine.dist import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    what, out_dir, *rest = sys.argv[1:]
    result = {"nonfinite": check_nonfinite, "stop_line": check_stop_line}[what](out_dir, *rest)
    print("RESULT " + json.dumps(result), flush=True)
