"""`engine.compile`: torch.compile each Transformer block, as torchtitan does.

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
    """`torch.compile` every Transformer block of `model` in place (torch.compile's `mode`);
    returns how many."""
    from mmpretrain.model.fusion import DecoderBlock
    from mmpretrain.model.layers import Block

    blocks = [m for m in model.modules() if isinstance(m, (Block, DecoderBlock))]
    for block in blocks:
        block.compile(dynamic=False, mode=None if mode == "default" else mode)
    log.info("engine.compile: torch.compile (mode %s) on %d transformer blocks (compiled on "
             "first use)", mode, len(blocks))
    return len(blocks)
