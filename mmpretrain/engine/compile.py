"""`engine.compile`: torch.compile each Transformer block, as torchtitan does (and the
LayerNorms outside the blocks).

Compiling block by block (instead of the whole model) keeps compile time to one graph per block
kind (every block of a tower shares the same code and shapes), lets activation checkpointing
wrap compiled blocks, and leaves the rest (embeddings, pooling, losses, DeepSpeed) eager.
`nn.Module.compile` compiles in place, so parameter names, checkpoints and exports are unchanged.
Inductor fuses what sits between the matrix multiplications: LayerNorm (fp32 statistics), bias
adds, GELU and residual adds. Attention is one node of a block's graph: SDPA as PyTorch's op,
the fused Triton kernel as our custom ops (`kernels/ops.py`, forward and backward), so each
block compiles to one graph with no break (`tests/triton_compile_checks.py`).

Shapes are static in training (fixed batch and context length), so blocks compile with
`dynamic=False`. Evaluation batches of other sizes compile their own graphs; incremental
decoding (captions) runs eagerly (`torch.compiler.set_stance("force_eager")` in
`model/generate.py`), since its sequence length grows every step.
"""
from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger("mmpretrain.engine")


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
