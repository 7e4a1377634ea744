"""Checkpoints: save/resume (`manager`), export to safetensors + transformers (`export`, `convert`).

Names are resolved lazily so that importing the package (as training does) does not load the
export's dependencies. `export_checkpoint` is `mmpretrain.checkpoint.export.export` (the
submodule owns the name `export`).
"""
from __future__ import annotations

import importlib
from typing import Any

_NAMES = {"CheckpointManager": ("manager", "CheckpointManager"),
          "ExportError": ("export", "ExportError"), "ExportReport": ("export", "ExportReport"),
          "export_checkpoint": ("export", "export"), "load_exported": ("export", "load_exported")}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'mmpretrain.checkpoint' has no attribute {name!r}")
    module, attr = _NAMES[name]
    return getattr(importlib.import_module(f"mmpretrain.checkpoint.{module}"), attr)
