"""Image<->text retrieval: recall@K over a held-out set where an image may have several captions.

Each rank embeds its share of the held-out shards (`retrieval_features`); `gather_features`
concatenates every rank's rows in rank order (sizes may differ: all_gather the sizes, pad,
all_gather, trim; gloo and nccl), shifting each caption's image index by the number of images of
the ranks before it, so every rank holds the whole set with each sample once. `recall_at_k` is a
pure function of the gathered features.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist

KS = (1, 5, 10)
CHUNK_ROWS = 1024  # query rows scored at once (bounds the (rows, N) similarity block)


def _check_inputs(image_features: torch.Tensor, text_features: torch.Tensor,
                  text_image: torch.Tensor) -> None:
    ni, nt = image_features.shape[0], text_features.shape[0]
    if ni == 0 or nt == 0:
        raise ValueError(f"retrieval needs at least one image and one text, got {ni} and {nt}")
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"image features (Ni, {image_features.shape[1]}) and text features "
                         f"(Nt, {text_features.shape[1]}) differ in width")
    if text_image.shape != (nt,):
        raise ValueError(f"text_image must be ({nt},), one image index per text, got "
                         f"{tuple(text_image.shape)}")
    if int(text_image.min()) < 0 or int(text_image.max()) >= ni:
        raise ValueError(f"text_image holds indices outside 0..{ni - 1}")
    orphans = torch.ones(ni, dtype=torch.bool, device=text_image.device)
    orphans[text_image] = False
    if orphans.any():
        raise ValueError(f"{int(orphans.sum())} image(s) have no caption (first: index "
                         f"{int(orphans.nonzero()[0])}): image->text recall is undefined")


def _hits(queries: torch.Tensor, keys: torch.Tensor,
          correct: Callable[[torch.Tensor, int], torch.Tensor], ks: Sequence[int]) -> list[int]:
    """Per k: queries whose top-min(k, N) keys hold a correct one (`correct(top, start)`)."""
    kmax = min(max(ks), keys.shape[0])
    found = torch.zeros(len(ks), dtype=torch.long, device=queries.device)
    for start in range(0, queries.shape[0], CHUNK_ROWS):
        sims = queries[start:start + CHUNK_ROWS] @ keys.T  # (c, N)
        top = sims.topk(kmax, dim=1).indices  # (c, kmax), best first
        within = correct(top, start).cumsum(dim=1) > 0  # (c, kmax): a hit among the first j+1
        found += torch.stack([within[:, min(k, kmax) - 1].sum() for k in ks])
    return found.tolist()


@torch.no_grad()
def recall_at_k(image_features: torch.Tensor, text_features: torch.Tensor,
                text_image: torch.Tensor, ks: Sequence[int] = KS) -> dict[str, float | int]:
    """Image->text and text->image recall@k over one set (k > set size is clamped to it).

    image_features (Ni, E) and text_features (Nt, E) are compared by dot product (pass unit
    vectors for cosine similarity); text_image (Nt,) is the index of each text's image. Image->
    text: an image is a hit when ANY of its captions is among its k best texts; text->image: a
    text is a hit when its image is among its k best images. Ties are broken by `topk`.
    Returns `retrieval_i2t_r{k}`, `retrieval_t2i_r{k}` (fractions), `retrieval_images`,
    `retrieval_texts`.
    """
    text_image = text_image.to(image_features.device, torch.long)
    _check_inputs(image_features, text_features, text_image)
    img, txt = image_features.float(), text_features.float()  # (Ni, E), (Nt, E)
    t2i = _hits(txt, img, lambda top, s: top == text_image[s:s + top.shape[0], None], ks)
    i2t = _hits(img, txt, lambda top, s: text_image[top] == torch.arange(
        s, s + top.shape[0], device=top.device)[:, None], ks)
    ni, nt = img.shape[0], txt.shape[0]
    out: dict[str, float | int] = {}
    out.update({f"retrieval_i2t_r{k}": h / ni for k, h in zip(ks, i2t)})
    out.update({f"retrieval_t2i_r{k}": h / nt for k, h in zip(ks, t2i)})
    out.update({"retrieval_images": ni, "retrieval_texts": nt})
    return out


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_rows(rows: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Every rank's `rows` (n_r, ...) concatenated in rank order, and the sizes n_r.

    Sizes may differ across ranks (all_gather the sizes, pad to the largest, all_gather, trim).
    Not distributed: `rows` itself and `[len(rows)]`."""
    if not _distributed():
        return rows, [rows.shape[0]]
    world = dist.get_world_size()
    size = torch.tensor([rows.shape[0]], dtype=torch.long, device=rows.device)
    sizes_t = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes_t, size)
    sizes = [int(s.item()) for s in sizes_t]
    largest = max(sizes)
    if largest == 0:
        return rows, sizes
    padded = rows.new_zeros((largest, *rows.shape[1:]))  # (largest, ...)
    padded[:rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sizes


def gather_features(image_features: torch.Tensor, text_features: torch.Tensor,
                    text_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather one rank's (n, E) images, (m, E) texts and (m,) local image indices from every
    rank; the indices are offset by the images of lower ranks so they index the gathered set."""
    images, sizes = all_gather_rows(image_features)  # (Ni, E)
    rank = dist.get_rank() if _distributed() else 0
    offset = sum(sizes[:rank])
    texts, _ = all_gather_rows(text_features)  # (Nt, E)
    owners, _ = all_gather_rows(text_image.to(text_features.device, torch.long) + offset)  # (Nt,)
    return images, texts, owners


@torch.no_grad()
def retrieval_features(model: Any, batches: Iterable[dict], tokenizer: Any, context_length: int,
                       normalize: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                       embed_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit-norm image (n, E) and caption (m, E) features of this rank's batches, and each
    caption's image index (m,) within this rank (every caption of `batch["captions"]`)."""
    images, texts, owners = [], [], []
    seen = 0
    for batch in batches:
        pixels = normalize(batch["image"].to(device, non_blocking=True))
        img = model.encode_image(pixels, normalize=True).float()  # (B, E)
        flat = [c for caps in batch["captions"] for c in caps]
        tokens = tokenizer.encode(flat, context_length).to(device)  # (T, L)
        txt = model.encode_text(tokens, normalize=True).float()  # (T, E)
        counts = torch.tensor([len(c) for c in batch["captions"]])
        images.append(img)
        texts.append(txt)
        owners.append(torch.arange(seen, seen + len(counts)).repeat_interleave(counts))  # (T,)
        seen += len(counts)
    if not images:
        empty = torch.empty((0, embed_dim), device=device)
        return empty, empty.clone(), torch.empty((0,), dtype=torch.long, device=device)
    return torch.cat(images), torch.cat(texts), torch.cat(owners).to(device)
