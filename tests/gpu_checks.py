"""Checks that need a GPU and a fresh process; run by the `gpu` tests of tests/test_engine.py.

    python tests/gpu_checks.py host_syncs OUT_DIR   # operations that made the host wait, per step

Each prints one JSON line with its measurements.
"""
from __future__ import annotations

import json
import os
import sys
import warnings

import torch

from engine_checks import _trainer

SYNC_WARNING = "synchronizing"
"""In the message of the warning `torch.cuda.set_sync_debug_mode("warn")` gives each operation
that makes the host wait for the device (`.item()`, `.tolist()`, a copy to the CPU, ...)."""


def _where(w: warnings.WarningMessage) -> str:
    """The Python line that called a synchronizing operation, relative to the repository (or
    to site-packages for a library's)."""
    path = w.filename
    for root in ("site-packages" + os.sep, os.getcwd() + os.sep):
        if root in path:
            path = path.split(root, 1)[1]
    return f"{path}:{w.lineno}"


def _logged_steps(t):
    """`n` steps as `Trainer.train` takes them (after `run_steps`): each step, then the
    after-step work (logging, flags, stop checks)."""
    t._wandb = t._make_wandb()

    def run(n: int) -> None:
        for _ in range(n):
            t._one_step(t._stream_iter)
            assert t._after_step() == "running"
    return run


def check_host_syncs(out: str) -> dict:
    """The real Trainer on one GPU (tiny model, bf16): after 3 warm-up steps, the synchronizing
    operations (`torch.cuda.set_sync_debug_mode`) of 4 more steps without logging, by the line
    that called them, for ZeRO-1, ZeRO-2 on the overlap path, ZeRO-1 compiled, CoCa (the
    captioning loss), ZeRO-1 through the training loop's own after-step work with a log line
    every step, and (listed only) ZeRO-3 and ZeRO-0. By design there are none: the previous
    step's flags and log line are read through events recorded behind them
    (`engine/host_read.py`), which wait for that step only while the GPU still has this step
    queued, and are not counted here."""
    runs = {"zero1": ["engine.zero_stage=1"],
            "zero2_overlap": ["engine.zero_stage=2", "engine.overlap_comm=true",
                              "engine.contiguous_gradients=true"],
            "zero1_compiled": ["engine.zero_stage=1", "engine.compile=true"],
            "coca_zero1": ["engine.zero_stage=1", "model.size=coca_tiny"],
            "zero1_logged": ["engine.zero_stage=1", "logging.log_every=1", "eval.every=0",
                             "checkpoint.every=0"],
            # for the record, not held to the rule: ZeRO-3 gathers and releases parameters
            # on its own streams and waits on them; ZeRO-0 in bf16 runs DeepSpeed's
            # BF16_Optimizer, whose step asserts on the gradient norm (a device tensor)
            "zero3_info": ["engine.zero_stage=3"],
            "zero0_info": ["engine.zero_stage=0"]}
    result = {}
    for name, overrides in runs.items():
        t = _trainer(out, f"syncs_{name}", "engine.device=cuda", "engine.precision=bf16",
                     "data.batch_size=8", "logging.log_every=1000", *overrides)
        t.run_steps(3)
        steps = _logged_steps(t) if name.endswith("_logged") else t.run_steps
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                steps(4)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        lines: dict[str, int] = {}
        for w in caught:
            if SYNC_WARNING in str(w.message):
                where = _where(w)
                lines[where] = lines.get(where, 0) + 1
        result[name] = {"steps": 4, "syncs": lines}
    return result


if __name__ == "__main__":
    from mmpretrain.engine.dist import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    what, out_dir, *rest = sys.argv[1:]
    result = {"host_syncs": check_host_syncs}[what](out_dir, *rest)
    print("RESULT " + json.dumps(result), flush=True)
