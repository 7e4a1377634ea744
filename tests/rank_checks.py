"""Several-rank checks that need a fresh process group; run by tests/test_engine.py.

    torchrun --nproc_per_node 2 tests/rank_checks.py dp_equal OUT_DIR  # ZeRO-1/2 == ZeRO-0

Each prints one JSON line with its measurements.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from engine_checks import _trainer


def check_dp_equal(out: str) -> dict:
    """2 ranks, fp32, 3 steps: ZeRO-1 and ZeRO-2 (the gradient path `auto` picks there, and
    the overlap path) end with the weights of ZeRO-0's plain data parallelism; the plain
    ZeRO-1/2 gradient path, which DeepSpeed does not reduce on CPU, is refused."""
    def weights(t) -> dict[str, torch.Tensor]:
        return {n: p.detach().float().clone() for n, p in t.engine.module.named_parameters()}

    runs = {"zero0": ["engine.zero_stage=0"]}
    for stage in (1, 2):
        runs[f"zero{stage}"] = [f"engine.zero_stage={stage}"]
        runs[f"zero{stage}_overlap"] = [f"engine.zero_stage={stage}", "engine.overlap_comm=true"]
    ends, start = {}, None
    for name, overrides in runs.items():
        t = _trainer(out, f"dp_{name}", "engine.precision=fp32", "data.batch_size=8", *overrides)
        start = start or weights(t)
        t.run_steps(3)
        ends[name] = weights(t)
    ref = ends.pop("zero0")
    result = {"world": dist.get_world_size(),
              "moved": max(float((ref[n] - w).abs().max()) for n, w in start.items()),
              "max_abs_diff": {name: max(float((w[n] - ref[n]).abs().max()) for n in ref)
                               for name, w in ends.items()}}
    try:
        _trainer(out, "dp_plain", "engine.zero_stage=1", "engine.contiguous_gradients=false")
        result["plain_refused"] = ""
    except ValueError as e:
        result["plain_refused"] = str(e)
    return result


if __name__ == "__main__":
    from mmpretrain.engine.dist import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    what, out_dir, *rest = sys.argv[1:]
    result = {"dp_equal": check_dp_equal}[what](out_dir, *rest)
    if os.environ.get("RANK", "0") == "0":
        print("RESULT " + json.dumps(result), flush=True)
