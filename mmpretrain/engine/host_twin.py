"""`mmpretrain bench train --host-twin`: the host's own work per training step, on any machine.

A GPU runs a step no faster than the host can issue it: Python, the autograd engine,
DeepSpeed's per-parameter hooks and bookkeeping, and one launch per kernel. Once nothing
synchronizes the device inside a step, that host work runs ahead of the GPU and hides behind
it; where it exceeds the GPU's time it becomes the step time.

The twin measures it without a GPU. It is the named model with every width cut to 32 (one
head of 32, images of 2 x 2 patches, 8-token text, a 512-token vocabulary), keeping each
tower's depth and therefore every parameter tensor, block, hook and graph the full model has
(`tests/test_bench_train.py` checks the names). Its arithmetic is then negligible, so on a CPU
the step time is close to the host's work per step: the same Python and dispatcher calls as on
a GPU, without the CUDA launch cost (a few microseconds per kernel). OpenCLIP's side builds the
same twin of its architecture and runs it as on a GPU (`torch.compile`, bf16 autocast, fused
AdamW); pass `engine.compile=true --precision bf16` to run ours as on a GPU too. Torch uses
one thread, so that intra-op threading does not count as host work; pin the process to one
core (`taskset -c 1`) for steadier numbers on a shared machine.
"""
from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

TWIN_WIDTH = 32


def twin_overrides(size: str) -> list[str]:
    """Our config overrides for the twin of the named size `size` (put before the user's own,
    which still win): images of 2 x 2 patches, so the patch size (and its weight) is kept."""
    from mmpretrain.model.registry import MODEL_SIZES

    if size not in MODEL_SIZES:
        raise ValueError(f"--host-twin needs a named model size, not {size!r}")
    patch = MODEL_SIZES[size]["vision"]["patch_size"]
    return [f"model.embed_dim={TWIN_WIDTH}", f"model.vision.width={TWIN_WIDTH}",
            "model.vision.heads=1", f"model.vision.image_size={2 * patch}",
            f"model.text.width={TWIN_WIDTH}", "model.text.heads=1",
            "model.text.context_length=8", "model.text.vocab_size=512"]


def open_clip_twin_config(arch: dict[str, Any]) -> dict[str, Any]:
    """OpenCLIP's model config `arch` (`open_clip.get_model_config`) cut like `twin_overrides`:
    the same layers, every width 32, one head per attention."""
    twin = copy.deepcopy(arch)
    twin["embed_dim"] = TWIN_WIDTH
    patch = twin["vision_cfg"]["patch_size"]
    twin["vision_cfg"].update(width=TWIN_WIDTH, head_width=TWIN_WIDTH, image_size=2 * patch)
    twin["text_cfg"].update(width=TWIN_WIDTH, heads=1, context_length=8, vocab_size=512)
    return twin


def register_open_clip_twin(open_clip: Any, name: str) -> str:
    """Add the twin of OpenCLIP's model `name` to OpenCLIP's registry as a model config file
    (`open_clip.add_model_config` reads it at once; the file is then removed); returns the
    twin's name."""
    twin = f"{name}-host-twin"
    with tempfile.TemporaryDirectory(prefix="mmpretrain-twin-") as folder:
        path = Path(folder) / f"{twin}.json"
        path.write_text(json.dumps(open_clip_twin_config(open_clip.get_model_config(name))))
        open_clip.add_model_config(path)
    return twin
