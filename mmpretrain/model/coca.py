"""CoCa: the two-tower model plus a multimodal decoder trained to caption (model.fusion.decoder).

The text tower runs once per forward: its pooled end-of-text output is the contrastive text
embedding and its token outputs feed the decoder, which attends to the image tower's tokens
(or to an attentional pooler's learned queries) and predicts the next caption token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmpretrain.config.schema import ModelConfig
from mmpretrain.model.clip import CLIP
from mmpretrain.model.fusion import MemoryKV, MultimodalDecoder
from mmpretrain.model.layers import KVCache


class CoCa(CLIP):
    """Contrastive two-tower model + captioning decoder (Yu et al., 2022, "CoCa")."""

    def __init__(self, cfg: ModelConfig, with_logit_bias: bool = False) -> None:
        super().__init__(cfg, with_logit_bias)
        self.decoder = MultimodalDecoder(cfg)
        self.context_length = cfg.text.context_length

    def forward(self, images: torch.Tensor, tokens: torch.Tensor,
                with_caption: bool = True) -> dict[str, torch.Tensor | None]:
        """images (B, 3, H, W), tokens (B, S) -> CLIP's outputs plus ``caption_logits``.

        ``caption_logits`` (B, S, V): position t predicts token t + 1 (absent when
        `with_caption` is False, e.g. the feature-only pass of gradient accumulation).
        """
        scale, bias = self.scale_and_bias()
        image_tokens = self.visual.forward_tokens(images)  # (B, 1+N, Wv)
        text_tokens = self.text.forward_tokens(tokens)  # (B, S, Wt)
        out: dict[str, torch.Tensor | None] = {
            "image_features": F.normalize(self.visual.pool(image_tokens), dim=-1),  # (B, E)
            "text_features": F.normalize(self.text.pool(text_tokens, tokens), dim=-1),  # (B, E)
            "logit_scale": scale,  # ()
            "logit_bias": bias,  # () or None
        }
        if with_caption:
            memory = self.decoder.memory(image_tokens)  # (B, M, Wm)
            out["caption_logits"] = self.decoder(text_tokens, memory)  # (B, S, V)
        return out

    def start_decoding(self, images: torch.Tensor) -> MemoryKV:
        """Normalized images (B, 3, H, W) -> every decoder block's cross-attention keys/values."""
        image_tokens = self.visual.forward_tokens(images)  # (B, 1+N, Wv)
        return self.decoder.memory_kv(self.decoder.memory(image_tokens))

    def decode_step(self, tokens: torch.Tensor, memory_kv: MemoryKV, text_cache: KVCache,
                    decoder_cache: KVCache, offset: int) -> torch.Tensor:
        """Next-token logits of new positions. tokens (B, s) at positions offset.. -> (B, s, V).

        The caches hold the earlier positions' keys/values and are extended in place."""
        text_tokens = self.text.forward_tokens(tokens, cache=text_cache, offset=offset)
        return self.decoder(text_tokens, memory_kv=memory_kv, cache=decoder_cache)  # (B, s, V)
