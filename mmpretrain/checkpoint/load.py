"""Load a trained model for evaluation or inference, from any of the places a run leaves one.

    cfg, model, tokenizer = load_for_inference("runs/demo_digits")

Accepted paths: a run directory (its newest complete checkpoint), a checkpoint directory
(`run/checkpoints/step_00000300`; ZeRO stages 0-3 are consolidated offline, as `export` does)
or an export directory written by `mmpretrain export` (or its `model.safetensors` file). The
model is built from the run's resolved config, loaded strictly, and put in eval mode.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mmpretrain.checkpoint.export import (MODEL_FILE, ExportError, consolidate, find_tokenizer,
                                          load_exported, load_run_config, resolve_checkpoint)
from mmpretrain.config.schema import ExperimentConfig


class CheckpointLoadError(ExportError):
    """The weights found do not fit the model their config describes (or cannot be read)."""


@dataclass
class ModelSource:
    """Where a model's weights, config and tokenizer come from."""

    kind: Literal["checkpoint", "export"]
    path: Path
    """The checkpoint directory (`step_*`), or the export's `model.safetensors`."""
    run_dir: Path | None
    """The run directory the weights were trained in, when known."""
    step: int | None
    """The training step of the weights, when known."""


def _export_metadata(file: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types on bad files
        raise ExportError(f"{file} is not a readable safetensors file: {exc}") from exc


def locate(path: str | os.PathLike) -> ModelSource:
    """What `path` holds (run dir, checkpoint dir, export dir or file); reads no weights.

    Raises FileNotFoundError for a missing path and ExportError for a path holding none."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist (expected a run directory, a checkpoint "
                                "directory or an export directory)")
    file = p if p.is_file() else p / MODEL_FILE
    if file.is_file() and not (p / "meta.json").is_file():
        meta = _export_metadata(file)
        if "mmpretrain_config" not in meta:
            raise ExportError(f"{file} has no embedded mmpretrain config: not written by "
                              "`mmpretrain export`")
        step = int(meta.get("mmpretrain_step", -1))
        source = meta.get("mmpretrain_source")
        run_dir = Path(source).parent.parent if source else None
        return ModelSource("export", file, run_dir, step if step >= 0 else None)
    ckpt, run_dir = resolve_checkpoint(p)
    step = ckpt.name.removeprefix("step_")
    return ModelSource("checkpoint", ckpt, run_dir, int(step) if step.isdigit() else None)


def _export_tokenizer(source: ModelSource, cfg: ExperimentConfig) -> Any:
    """The export's own tokenizer (its hf/ folder), else the source run's, else data.tokenizer."""
    from mmpretrain.data.tokenize import load_tokenizer

    hf_dir = source.path.parent / "hf"
    if (hf_dir / "tokenizer.json").is_file():
        return load_tokenizer(str(hf_dir))
    if source.run_dir is not None and (source.run_dir / "tokenizer").is_dir():
        return find_tokenizer(source.run_dir, cfg)
    return load_tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer else None


def build_loaded_model(cfg: ExperimentConfig, state: dict[str, torch.Tensor],
                       origin: str) -> torch.nn.Module:
    """The model `cfg` describes with `state` loaded strictly; errors list missing/unexpected
    keys and name `origin`."""
    from mmpretrain.model import build_model, local_model_config

    model = build_model(local_model_config(cfg.model, origin), cfg.loss.kind)
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    wrong = sorted(k for k in expected if k in state and state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointLoadError(
            f"{origin}: the weights do not fit the model of its config: missing keys "
            f"{missing[:20]}{' ...' if len(missing) > 20 else ''}, unexpected keys "
            f"{unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}, wrong shapes "
            f"{[(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in wrong[:10]]}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in state.items()}, strict=True)
    return model.eval()


def load_for_inference(path: str | os.PathLike | ModelSource, device: str | torch.device = "cpu",
                       trust_checkpoint: bool = False) -> tuple[ExperimentConfig, torch.nn.Module,
                                                                Any]:
    """(config, model in eval mode on `device`, tokenizer or None) of a run directory, a
    checkpoint directory or an export directory (see the module doc). Weights are fp32.

    `trust_checkpoint` allows full unpickling of DeepSpeed files (as `export
    --trust-checkpoint`)."""
    from mmpretrain.checkpoint.convert import split_task_state

    source = path if isinstance(path, ModelSource) else locate(path)
    if source.kind == "export":
        state, cfg = load_exported(source.path)
        tokenizer = _export_tokenizer(source, cfg)
    else:
        assert source.run_dir is not None
        cfg, _meta = load_run_config(source.path, source.run_dir)
        task_state, _ = consolidate(source.path, cfg, trust_checkpoint)
        state, _rest = split_task_state(task_state)  # the rest: loss state, no model weights
        tokenizer = find_tokenizer(source.run_dir, cfg)
    model = build_loaded_model(cfg, state, str(source.path))
    return cfg, model.to(device), tokenizer
