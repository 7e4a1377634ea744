"""`engine.float8`: the Transformer blocks' linear layers in float8, with torchao.

The matmuls of a linear layer, forward and both backward ones, run on float8 tensor cores
(H100/H200: twice the dense bf16 rate) with dynamic scaling: each operand is scaled by its
absolute maximum and cast to float8 (e4m3 for inputs and weights, e5m2 for gradients in the
`tensorwise` recipe) just before the matmul, which accumulates in fp32 and returns the run's
precision. Weights, gradients, optimizer state and checkpoints stay as they are (bf16 weights,
fp32 master copy under DeepSpeed); only the matmuls' operands are rounded.

Why torchao (`torchao.float8`, the PyTorch team's float8 training library, which torchtitan
uses) rather than our own: the casts need fused amax reductions and scaled-matmul calls in
all three matmuls with the right layouts and recipes; torchao keeps them tested against each
PyTorch release. It is an optional extra (`pip install 'mmpretrain[fp8]'`).

Which layers: the `nn.Linear`s inside Transformer blocks (QKV, attention output, MLP, the
decoder's cross-attention), whose dimensions are multiples of 16 (the float8 matmul's
requirement). The patch embedding, the towers' output projections, the decoder's input
projection and LM head stay in the run's precision: they are the first and last layers, small
(M = the batch for the projections), and where rounding costs the most accuracy, as
torchtitan's float8 filter also skips the first and last layers.

Speed needs `engine.compile=true`: Inductor fuses each cast into the op that produces its
input; eagerly every cast is an extra pass over the activation.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import torch
from torch import nn

log = logging.getLogger("mmpretrain.engine")

RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (sm_89), Hopper (sm_90) and newer


def _torchao_float8() -> tuple:
    """Import torchao's float8 training API, or say how to get it."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise RuntimeError(
            f"engine.float8 needs torchao ({e}); install it with "
            "pip install 'mmpretrain[fp8]'") from e
    return Float8LinearConfig, convert_to_float8_training


def check_device(device: torch.device) -> None:
    """Refuse a CUDA device without float8 tensor cores (CPU runs, for tests, are allowed)."""
    if device.type != "cuda":
        return
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        raise RuntimeError(
            f"engine.float8 needs float8 tensor cores (compute capability >= "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}: Ada, Hopper or newer); "
            f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}")


def block_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """(name, layer) of every `nn.Linear` inside a Transformer block of `model`."""
    from mmpretrain.model import transformer_blocks

    for name, block in transformer_blocks(model):
        for sub, layer in block.named_modules():
            if isinstance(layer, nn.Linear):
                yield f"{name}.{sub}", layer


def convertible(layer: nn.Linear) -> bool:
    """Whether float8's matmul takes this layer's shapes (both dimensions multiples of 16)."""
    return layer.in_features % 16 == 0 and layer.out_features % 16 == 0


def convert_float8(model: nn.Module, recipe: str, device: torch.device,
                   micro_batch: int, compiled: bool = True) -> list[str]:
    """Swap the block linears of `model` for torchao's `Float8Linear` in place (same
    parameters, so names, checkpoints and exports are unchanged); returns their names.

    The weight gradient's float8 matmul contracts over the tokens of a micro-batch (B x S),
    which CUDA's scaled matmul needs in multiples of 16. A batch that is a multiple of 16
    guarantees it for every sequence length; other batches make each such matmul pad its
    operands (a copy of each), as torchao's `pad_inner_dim` does, with a note in the log.
    `compiled`: whether the blocks will be compiled (on CUDA a warning says when not)."""
    if recipe not in RECIPES:
        raise ValueError(f"engine.float8: unknown recipe {recipe!r} (known: {', '.join(RECIPES)})")
    check_device(device)
    config_cls, convert = _torchao_float8()
    linears = list(block_linears(model))
    chosen = {id(layer): name for name, layer in linears if convertible(layer)}
    odd = [name for name, layer in linears if not convertible(layer)]
    if not chosen:
        raise ValueError("engine.float8: no linear layer inside a Transformer block has both "
                         "dimensions a multiple of 16; nothing would run in float8")
    config = config_cls.from_recipe_name(recipe)
    if micro_batch % 16:
        config = dataclasses.replace(config, pad_inner_dim=True)
        log.info("engine.float8: data.batch_size %d is not a multiple of 16, so the weight "
                 "gradients' float8 matmuls pad their token dimension (a copy of each operand); "
                 "a multiple of 16 avoids it", micro_batch)
    convert(model, module_filter_fn=lambda layer, _fqn: id(layer) in chosen, config=config)
    outside = sum(isinstance(m, nn.Linear) for m in model.modules()) - len(chosen) - len(odd)
    log.info("engine.float8 (%s): %d linear layers in float8; in the run's precision: %d "
             "outside the blocks%s", recipe, len(chosen), outside,
             f", {len(odd)} in blocks with dimensions not multiples of 16 (e.g. {odd[0]})"
             if odd else "")
    if device.type == "cuda" and not compiled:
        log.warning("engine.float8 without engine.compile: each float8 cast is a pass of its "
                    "own over the activations, so the run is likely slower than in bf16")
    return sorted(chosen.values())
