"""State-dict key mapping between mmpretrain's two-tower model and `transformers.CLIPModel`.

Pure functions on tensors and plain data (no DeepSpeed, no transformers import), used by
`checkpoint/export.py`. Our names are those of `mmpretrain.model.CLIP.state_dict()` (without the
`model.` prefix the training task adds). The mapping, per tower (`visual` -> `vision_model`,
`text` -> `text_model`):

    visual.patch_embed.weight            vision_model.embeddings.patch_embedding.weight
    visual.class_embedding               vision_model.embeddings.class_embedding
    visual.positional_embedding          vision_model.embeddings.position_embedding.weight
    visual.ln_pre.*                      vision_model.pre_layrnorm.*   (HF's spelling)
    visual.ln_post.*                     vision_model.post_layernorm.*
    visual.proj.weight                   visual_projection.weight   (Linear(W, E, bias=False))
    text.token_embedding.weight          text_model.embeddings.token_embedding.weight
    text.positional_embedding            text_model.embeddings.position_embedding.weight
    text.ln_final.*                      text_model.final_layer_norm.*
    text.proj.weight                     text_projection.weight
    <tower>.transformer.blocks.{i}.      <tower>_model.encoder.layers.{i}.
        ln1.* / ln2.*                        layer_norm1.* / layer_norm2.*
        attn.qkv.{weight,bias}               self_attn.{q,k,v}_proj.{weight,bias} (split in 3 rows)
        attn.proj.*                          self_attn.out_proj.*
        mlp.fc1.* / mlp.fc2.*                mlp.fc1.* / mlp.fc2.*
    logit_scale (shape [1])              logit_scale (0-dim), clamped at log(max_logit_scale)

Anything else (the SigLIP `logit_bias`, a future fusion decoder, ...) has no CLIPModel
counterpart: `to_hf_state_dict` returns it separately so callers report it instead of dropping it.
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

TASK_PREFIX = "model."
"""Prefix of the model's keys in a DeepSpeed checkpoint (DeepSpeed wraps `ContrastiveTask`)."""

_DIRECT = {
    "visual.patch_embed.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.proj.weight": "visual_projection.weight",
    "text.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "text.positional_embedding": "text_model.embeddings.position_embedding.weight",
    "text.ln_final.weight": "text_model.final_layer_norm.weight",
    "text.ln_final.bias": "text_model.final_layer_norm.bias",
    "text.proj.weight": "text_projection.weight",
}
_TOWERS = {"visual": "vision_model", "text": "text_model"}
_BLOCK = {"ln1": "layer_norm1", "ln2": "layer_norm2", "attn.proj": "self_attn.out_proj",
          "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_BLOCK_RE = re.compile(r"^(visual|text)\.transformer\.blocks\.(\d+)\.(.+)\.(weight|bias)$")
_HF_BLOCK_RE = re.compile(
    r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_QKV = ("q_proj", "k_proj", "v_proj")


def split_task_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                              dict[str, torch.Tensor]]:
    """Split a `ContrastiveTask` state dict into (model weights without `model.`, the rest).

    The rest is normally empty (the losses have no parameters); the caller reports it.
    """
    model, rest = {}, {}
    for key, value in state.items():
        if key.startswith(TASK_PREFIX):
            model[key[len(TASK_PREFIX):]] = value
        else:
            rest[key] = value
    return model, rest


def _block_to_hf(match: re.Match, value: torch.Tensor) -> dict[str, torch.Tensor] | None:
    tower, idx, sub, kind = match.groups()
    prefix = f"{_TOWERS[tower]}.encoder.layers.{idx}."
    if sub == "attn.qkv":
        q, k, v = value.chunk(3, dim=0)  # rows: [q heads..., k heads..., v heads...]
        return {f"{prefix}self_attn.{name}.{kind}": t.contiguous()
                for name, t in zip(_QKV, (q, k, v))}
    if sub in _BLOCK:
        return {f"{prefix}{_BLOCK[sub]}.{kind}": value}
    return None


def to_hf_state_dict(state: dict[str, torch.Tensor], max_logit_scale: float | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Map our model's state dict to CLIPModel's; returns (hf_state, unmapped).

    `unmapped` holds every key CLIPModel has no place for (e.g. `logit_bias`). With
    `max_logit_scale`, `logit_scale` is clamped at its log so CLIPModel's unclamped
    `logit_scale.exp()` equals the scale our model uses.
    """
    hf: dict[str, torch.Tensor] = {}
    unmapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _DIRECT:
            hf[_DIRECT[key]] = value
        elif key == "logit_scale":
            scale = value.reshape(())
            if max_logit_scale is not None:
                scale = scale.clamp(max=math.log(max_logit_scale))
            hf["logit_scale"] = scale.clone()
        elif (m := _BLOCK_RE.match(key)) and (mapped := _block_to_hf(m, value)) is not None:
            hf.update(mapped)
        else:
            unmapped[key] = value
    return hf, unmapped


def from_hf_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `to_hf_state_dict` for the keys it maps (q/k/v fused back into qkv)."""
    inverse = {v: k for k, v in _DIRECT.items()}
    towers = {v: k for k, v in _TOWERS.items()}
    block = {v: k for k, v in _BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in hf.items():
        if key in inverse:
            out[inverse[key]] = value
        elif key == "logit_scale":
            out["logit_scale"] = value.reshape(1).clone()
        elif m := _HF_BLOCK_RE.match(key):
            tower, idx, sub, kind = m.groups()
            prefix = f"{towers[tower]}.transformer.blocks.{idx}."
            if sub.startswith("self_attn.") and sub.split(".")[1] in _QKV:
                qkv.setdefault(f"{prefix}attn.qkv.{kind}", {})[sub.split(".")[1]] = value
            elif sub in block:
                out[f"{prefix}{block[sub]}.{kind}"] = value
            else:
                raise KeyError(f"no mmpretrain name for {key}")
        elif not key.endswith("position_ids"):
            raise KeyError(f"no mmpretrain name for {key}")
    for key, parts in qkv.items():
        out[key] = torch.cat([parts[name] for name in _QKV], dim=0)
    return out


def _unique(values: set, what: str) -> Any:
    if len(values) != 1:
        raise ValueError(f"CLIPModel needs one {what} for the whole model, found {sorted(values)}")
    return values.pop()


def hidden_act(model: nn.Module) -> str:
    """The `transformers` activation name of every MLP's activation (must be one kind)."""
    names = set()
    for module in model.modules():
        if isinstance(module, nn.GELU):
            names.add("gelu" if module.approximate == "none" else "gelu_pytorch_tanh")
        elif type(module).__name__ == "QuickGELU":
            names.add("quick_gelu")
        elif isinstance(module, (nn.ReLU, nn.SiLU)):
            names.add({nn.ReLU: "relu", nn.SiLU: "silu"}[type(module)])
    return _unique(names, "activation")


def layer_norm_eps(model: nn.Module) -> float:
    """The epsilon shared by every LayerNorm of the model."""
    return _unique({m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)},
                   "LayerNorm eps")


def hf_incompatibilities(model_cfg: Any) -> list[str]:
    """Reasons a CLIPModel cannot compute what our model computes (empty: it can)."""
    problems = []
    if model_cfg.vision.pool != "cls":
        problems.append(
            f"model.vision.pool={model_cfg.vision.pool!r}: CLIPModel always pools the class "
            "token; a mean-pooled image tower would silently give different image embeddings")
    return problems


def hf_config_dict(model_cfg: Any, model: nn.Module, specials: dict[str, int],
                   vocab_size: int | None = None) -> dict[str, Any]:
    """Keyword arguments of `transformers.CLIPConfig` describing our model.

    `model_cfg` is the run's `ModelConfig`; `model` the built model (activation and LayerNorm
    eps are read from its modules, not assumed); `specials` maps pad/sot/eot to token ids.
    """
    act, eps = hidden_act(model), layer_norm_eps(model)
    v, t = model_cfg.vision, model_cfg.text
    common = {"hidden_act": act, "layer_norm_eps": eps, "attention_dropout": 0.0,
              "projection_dim": model_cfg.embed_dim}
    vision = {**common, "hidden_size": v.width, "intermediate_size": int(v.width * v.mlp_ratio),
              "num_hidden_layers": v.layers, "num_attention_heads": v.heads, "num_channels": 3,
              "image_size": v.image_size, "patch_size": v.patch_size}
    text = {**common, "hidden_size": t.width, "intermediate_size": int(t.width * t.mlp_ratio),
            "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
            "vocab_size": vocab_size or t.vocab_size, "max_position_embeddings": t.context_length,
            "pad_token_id": specials["pad"], "bos_token_id": specials["sot"],
            "eos_token_id": specials["eot"]}
    if text["eos_token_id"] == 2:
        raise ValueError("end-of-text id 2 makes transformers' CLIP text model pool at the "
                         "largest token id (legacy behaviour), not at the end-of-text token")
    return {"text_config": text, "vision_config": vision, "projection_dim": model_cfg.embed_dim,
            "logit_scale_init_value": float(model_cfg.init_logit_scale)}
