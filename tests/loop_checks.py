"""Training-loop checks that need a real DeepSpeed engine in a fresh process; run by
tests/test_steplog.py.

    python tests/loop_checks.py stop_line OUT_DIR   # the log line of the step a stop signal ends

Each prints one JSON line with its measurements.
"""
from __future__ import annotations

import json
import os
import sys

from engine_checks import _trainer


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
    result = {"stop_line": check_stop_line}[what](out_dir, *rest)
    print("RESULT " + json.dumps(result), flush=True)
