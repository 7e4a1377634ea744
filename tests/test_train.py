"""End-to-end training through the real DeepSpeed engine on CPU (gloo)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import losses, run_train
from mmpretrain.config.load import load_config
from mmpretrain.logging.flops import train_flops_per_sample
from mmpretrain.logging.metrics import read_jsonl


def _common(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [f"output_dir={tmp_path}", f"name={name}", "logging.log_every=1",
            "logging.wandb_mode=disabled", *extra]


def test_single_process_loss_decreases(tmp_path: Path) -> None:
    run_train(_common(tmp_path, "single", "optim.steps=20", "engine.zero_stage=0",
                      "optim.lr=2e-3", "checkpoint.every=0", "logging.wandb_mode=offline"))
    run_dir = tmp_path / "single"
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline wandb run written"
    trace = losses(run_dir)
    assert sorted(trace) == list(range(1, 21))
    first, last = sum(trace[s] for s in (1, 2, 3)) / 3, sum(trace[s] for s in (18, 19, 20)) / 3
    assert last < 0.8 * first, trace
    records = read_jsonl(run_dir / "metrics.jsonl")
    for key in ("lr", "grad_norm", "samples_per_s", "data_wait_frac", "peak_mem_gb",
                "tflops_per_s"):
        assert key in records[-1], key
    flops = train_flops_per_sample(load_config(run_dir / "config.yaml").model)
    assert records[-1]["tflops_per_s"] > 0
    assert records[-1]["tflops_per_s"] == pytest.approx(
        flops * records[-1]["samples_per_s"] / 1e12)  # one rank
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "step_00000020" / "meta.json").is_file()  # save_final


@pytest.mark.slow
@pytest.mark.parametrize("engine", [
    ["engine.zero_stage=1"],
    ["engine.zero_stage=2"],
    ["engine.zero_stage=3"],
    ["engine.zero_stage=2", "engine.offload_optimizer=true", "model.activation_checkpointing=true"],
    # the memory-limit setting: ZeRO-3, optimizer state and weights in CPU memory
    ["engine.zero_stage=3", "engine.offload_optimizer=true", "engine.offload_params=true",
     "model.activation_checkpointing=true"],
    # CoCa: caption decoder with a pooler, accumulation, and a fusion head that no loss trains
    ["engine.zero_stage=2", "model.size=coca_tiny", "model.fusion.pool_queries=4",
     "model.fusion.head=gated", "engine.grad_accum=2"],
], ids=["zero1", "zero2", "zero3", "zero2-offload-actckpt", "zero3-offload-params-actckpt",
        "zero2-coca-accum"])
def test_two_rank_resume_is_exact(tmp_path: Path, engine: list[str]) -> None:
    """2 ranks: stop at step 10, resume, and steps 11-20 equal an uninterrupted run."""
    base = ["optim.steps=20", "checkpoint.every=10", "data.batch_size=16", *engine]
    run_train(_common(tmp_path, "full", *base), nproc=2)
    run_train(_common(tmp_path, "split", *base, "optim.stop_after=10"), nproc=2)
    split = tmp_path / "split"
    assert sorted(losses(split)) == list(range(1, 11))
    meta = json.loads((split / "checkpoints" / "step_00000010" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 10
    out = run_train(_common(tmp_path, "split", *base), nproc=2)
    assert "resumed from" in out.stdout
    full, resumed = losses(tmp_path / "full"), losses(split)
    assert sorted(resumed) == list(range(1, 21))
    assert [resumed[s] for s in range(11, 21)] == [full[s] for s in range(11, 21)]


@pytest.mark.slow
def test_demo_data_resume_with_workers(tmp_path: Path) -> None:
    """Real shards through DataLoader workers: resume mid-epoch reproduces the loss trace."""
    cfg = "experiments/demo_digits.yaml"
    common = ["optim.steps=12", "checkpoint.every=6", "data.num_workers=2", "data.batch_size=32",
              f"data.cache_dir={tmp_path / 'cache'}", "eval.at_end=false"]
    run_train(_common(tmp_path, "full", *common), config=cfg)
    run_train(_common(tmp_path, "split", *common, "optim.stop_after=6"), config=cfg)
    run_train(_common(tmp_path, "split", *common), config=cfg)
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert [resumed[s] for s in range(7, 13)] == [full[s] for s in range(7, 13)]
    assert (tmp_path / "split" / "tokenizer" / "tokenizer.json").is_file()
