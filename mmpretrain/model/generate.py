"""Caption generation for CoCa models: greedy decoding and beam search, both with a KV cache.

Each step feeds only the newest token through the text tower and the decoder; their causal
self-attention reads the earlier positions' keys/values from `KVCache`s, and the decoder's
cross-attention keys/values of the image are computed once (`CoCa.start_decoding`).

Beam search follows the usual scheme (as in Hugging Face's `generate` with early stopping):
each step ranks 2K continuations of the K live beams by total log-probability; a continuation
ending in the end-of-text token finishes a hypothesis if it ranks among the first K, otherwise
it is dropped; the first K others live on. An image is done when it has K finished hypotheses
(or at the length limit, where the live beams are finished as they are). The result is the
finished hypothesis with the best score / length**length_penalty. With K = 1 this is exactly
greedy decoding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mmpretrain.model.layers import KVCache


@dataclass
class Special:
    """The token ids generation needs."""

    sot: int
    eot: int
    pad: int = 0


class _Decoder:
    """Incremental decoding state of B rows: memory keys/values, the two caches, the position."""

    def __init__(self, model: torch.nn.Module, images: torch.Tensor, repeat: int = 1) -> None:
        self.model = model
        self.memory_kv = [(k.repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0))
                          for k, v in model.start_decoding(images)]
        self.text_cache, self.decoder_cache = KVCache(), KVCache()
        self.offset = 0

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, 1) at the next position -> log-probabilities of the next token (B, V)."""
        logits = self.model.decode_step(tokens, self.memory_kv, self.text_cache,
                                        self.decoder_cache, self.offset)  # (B, 1, V)
        self.offset += tokens.shape[1]
        return torch.log_softmax(logits[:, -1].float(), dim=-1)  # (B, V)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` of both caches (the memory is the same for beams of one image)."""
        self.text_cache.reorder(index)
        self.decoder_cache.reorder(index)


def _check(model: torch.nn.Module, max_len: int) -> int:
    if not hasattr(model, "start_decoding"):
        raise ValueError("caption generation needs a model with a caption decoder "
                         "(model.fusion.decoder: true)")
    limit = model.context_length
    if max_len <= 1 or max_len > limit:
        return limit
    return max_len


@torch.no_grad()
def greedy(model: torch.nn.Module, images: torch.Tensor, special: Special,
           max_len: int = 0) -> list[list[int]]:
    """Greedy captions of normalized images (B, 3, H, W): token ids without sot/eot.

    `max_len`: positions including sot and eot (0 or out of range: the context length)."""
    max_len = _check(model, max_len)
    dec = _Decoder(model, images)
    b = images.shape[0]
    tokens = torch.full((b, 1), special.sot, dtype=torch.long, device=images.device)  # (B, 1)
    out: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool, device=images.device)  # (B,)
    for _ in range(max_len - 1):
        nxt = dec.step(tokens).argmax(dim=-1)  # (B,)
        for row in (~done).nonzero().flatten().tolist():
            if int(nxt[row]) != special.eot:
                out[row].append(int(nxt[row]))
        done |= nxt == special.eot
        if bool(done.all()):
            break
        tokens = nxt[:, None]  # (B, 1)
    return out


@torch.no_grad()
def beam_search(model: torch.nn.Module, images: torch.Tensor, special: Special,
                beam_width: int = 3, max_len: int = 0,
                length_penalty: float = 1.0) -> list[list[int]]:
    """Beam-search captions of normalized images (B, 3, H, W): ids without sot/eot."""
    if beam_width < 1:
        raise ValueError(f"beam width must be >= 1, got {beam_width}")
    max_len = _check(model, max_len)
    k, b, device = beam_width, images.shape[0], images.device
    dec = _Decoder(model, images, repeat=k)
    seqs: list[list[int]] = [[] for _ in range(b * k)]  # row b*k + j: beam j of image b
    scores = torch.full((b, k), float("-inf"), device=device)  # (B, K)
    scores[:, 0] = 0.0  # one live beam per image at the start (no duplicates)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    tokens = torch.full((b * k, 1), special.sot, dtype=torch.long, device=device)  # (BK, 1)
    for step in range(max_len - 1):
        logp = dec.step(tokens).view(b, k, -1)  # (B, K, V)
        vocab = logp.shape[-1]
        cand = (scores[:, :, None] + logp).view(b, -1)  # (B, K*V)
        top, idx = cand.topk(min(2 * k, cand.shape[1]), dim=-1)  # (B, 2K)
        new_scores, origin, new_tok = _select(top, idx, vocab, k, seqs, finished, special,
                                              step + 1, length_penalty)
        scores = new_scores.to(device)  # (B, K)
        index = torch.tensor(origin, dtype=torch.long, device=device)  # (BK,)
        seqs = [seqs[o] + [t] for o, t in zip(origin, new_tok)]
        if all(len(f) >= k for f in finished):
            break
        dec.reorder(index)
        tokens = torch.tensor(new_tok, dtype=torch.long, device=device)[:, None]  # (BK, 1)
    for i in range(b):
        if len(finished[i]) < k:  # length limit: live beams finish as they are
            for j in range(k):
                if scores[i, j] > float("-inf"):
                    n = len(seqs[i * k + j])
                    finished[i].append((float(scores[i, j]) / max(n, 1) ** length_penalty,
                                        seqs[i * k + j]))
    return [max(f, key=lambda s: s[0])[1] for f in finished]


def _select(top: torch.Tensor, idx: torch.Tensor, vocab: int, k: int, seqs: list[list[int]],
            finished: list[list[tuple[float, list[int]]]], special: Special, length: int,
            length_penalty: float) -> tuple[torch.Tensor, list[int], list[int]]:
    """One beam step's bookkeeping: finish eot continuations ranked < K, keep K live ones.

    Returns the live beams' scores (B, K), their source rows and their new tokens (B*K)."""
    b = top.shape[0]
    scores = torch.full((b, k), float("-inf"))
    origin, new_tok = [], []
    top_l, idx_l = top.tolist(), idx.tolist()
    for i in range(b):
        live: list[tuple[float, int, int]] = []
        for rank, (score, flat) in enumerate(zip(top_l[i], idx_l[i])):
            beam, tok = divmod(flat, vocab)
            if score == float("-inf"):
                continue
            if tok == special.eot:
                if rank < k and len(finished[i]) < k:
                    finished[i].append((score / length ** length_penalty,
                                        seqs[i * k + beam]))
            elif len(live) < k:
                live.append((score, beam, tok))
        for j in range(k):
            score, beam, tok = live[j] if j < len(live) else (float("-inf"), 0, special.pad)
            scores[i, j] = score
            origin.append(i * k + beam)
            new_tok.append(tok)
    return scores, origin, new_tok


def generate(model: torch.nn.Module, images: torch.Tensor, special: Special,
             beam_width: int = 1, max_len: int = 0,
             length_penalty: float = 1.0) -> list[list[int]]:
    """Greedy (`beam_width` 1) or beam-search captions; token ids without sot/eot.

    Runs eagerly even where blocks are compiled (`engine.compile`): the decoded length grows
    every step, so compiled graphs would be rebuilt for each new length."""
    with torch.compiler.set_stance("force_eager"):
        if beam_width == 1:
            return greedy(model, images, special, max_len)
        return beam_search(model, images, special, beam_width, max_len, length_penalty)
