"""`engine.compile`: torch.compile the model's training forward as one graph (as OpenCLIP's
`--torchcompile` does) or each Transformer block on its own (as torchtitan does).

Every block (and every LayerNorm outside the blocks) is compiled either way: evaluation calls
`encode_image`/`encode_text`, not the model's forward, and runs through them. With
`engine.compile_scope=model` the model's forward is compiled too; Dynamo traces through the
compiled blocks into one graph for both towers (and the decoder), so a training step crosses
one compiled region each way instead of one per block and LayerNorm (27 for ViT-B/16 CLIP):
each region's call costs guard checks, AOTAutograd's runtime wrappers and an autograd node:
block by block took 1.26-1.29x the host time per step of one graph on the ViT-B/16 and
L/14 host twins (`bench host-ab`).
Block by block keeps compile time to one graph per block kind and gives each block's
gradients to DeepSpeed's hooks as soon as its backward ends, so a gradient reduction or an
offload copy can overlap the rest of the backward; in one graph every gradient appears at the
end. And checkpointed blocks compiled one by one save only their inputs (inside one graph
Inductor kept 3.3x as many activation bytes in the tiny model). So `auto` is the one graph only
on one rank without `offload_optimizer` and without activation checkpointing.
`nn.Module.compile` compiles in place, so parameter names, checkpoints and exports are unchanged.
Inductor fuses what sits between the matrix multiplications: LayerNorm (fp32 statistics), bias
adds, GELU and residual adds. Attention is one node of a block's graph: SDPA as PyTorch's op,
the fused Triton kernel as our custom ops (`kernels/ops.py`, forward and backward), so each
block compiles to one graph with no break, and so does the whole model through its
compiled blocks (`tests/triton_compile_checks.py`).

Shapes are static in training (fixed batch and context length), so blocks compile with
`dynamic=False`. Evaluation batches of other sizes compile their own graphs; incremental
decoding (captions) runs eagerly (`torch.compiler.set_stance("force_eager")` in
`model/generate.py`), since its sequence length grows every step.
"""
from __future__ import annotations

import logging
from typing import Any

from torch import nn

log = logging.getLogger("mmpretrain.engine")


def compile_scope(cfg: Any, world_size: int) -> str:
    """Resolve `engine.compile_scope` ('model' or 'blocks') for an `ExperimentConfig` run on
    `world_size` ranks (see the module docstring for the trade-off)."""
    choice = cfg.engine.compile_scope
    if choice != "auto":
        return choice
    whole = (world_size == 1 and not cfg.engine.offload_optimizer
             and not cfg.model.activation_checkpointing)
    return "model" if whole else "blocks"


def compile_model(model: nn.Module, mode: str = "default", scope: str = "model") -> int:
    """Compile `model`'s blocks and outer LayerNorms (`compile_blocks`) and, with scope
    'model', its forward as one graph (torch.compile's `mode`); returns how many modules."""
    if scope not in ("model", "blocks"):
        raise ValueError(f"compile scope must be 'model' or 'blocks', got {scope!r}")
    n = compile_blocks(model, mode)
    if scope == "model":
        model.compile(dynamic=False, mode=None if mode == "default" else mode)
        log.info("engine.compile: the training forward of %s as one graph (scope model)",
                 type(model).__name__)
        n += 1
    return n


def compile_blocks(model: nn.Module, mode: str = "default") -> int:
    """`torch.compile` every Transformer block of `model` in place (torch.compile's `mode`),
    and every LayerNorm outside the blocks (ln_pre, ln_post, ln_final, the poolers'; default
    mode); returns how many modules.

    The LayerNorms outside the blocks run in fp32 on bf16 activations: eagerly that is a cast
    up, the norm and a cast down, each a pass over (B, S, W) in memory, and more passes in the
    backward (the H200 trace's eager LayerNorm backward took 0.4 ms a call at ViT-B/16, batch
    256); compiled, one fused kernel each way."""
    from mmpretrain.model import transformer_blocks
    from mmpretrain.model.layers import LayerNorm

    blocks = [block for _, block in transformer_blocks(model)]
    inside = {id(m) for block in blocks for m in block.modules()}
    norms = [m for m in model.modules() if isinstance(m, LayerNorm) and id(m) not in inside]
    for block in blocks:
        block.compile(dynamic=False, mode=None if mode == "default" else mode)
    for norm in norms:
        norm.compile(dynamic=False, mode=None)
    log.info("engine.compile: torch.compile (mode %s) on %d transformer blocks and %d "
             "LayerNorms outside them (compiled on first use)", mode, len(blocks), len(norms))
    return len(blocks) + len(norms)
