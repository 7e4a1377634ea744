"""Caption tokenization: a thin wrapper over a fast Hugging Face `tokenizers.Tokenizer`.

Token rows are `[<start_of_text>] + ids + [<end_of_text>]`, truncated so that the end token is
always the last real token, and right-padded with 0. The pad id MUST be 0: the text model pads
with 0 and pools its output at the last non-zero token (the end token).

Nothing is downloaded: a run either loads a local tokenizer (`data.tokenizer`) or fits a
byte-level BPE on its own training captions (`train_tokenizer`) and saves it in the run dir.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import tokenizers
import torch
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from .shards import expand_pattern, iter_shard_samples, write_json_atomic

TOKENIZER_FILE = "tokenizer.json"
SIDECAR_FILE = "mmpretrain_tokenizer.json"
# Fitted tokenizers get ids in this order: pad 0, unk 1, sot 2, eot 3. The end-of-text id must not
# be 2: transformers' CLIP text model treats eos_token_id == 2 as "legacy" and pools at the
# largest token id instead of at the end-of-text token, which would break exported models.
ROLES = ("pad", "unk", "sot", "eot")
DEFAULT_SPECIALS = {"pad": "<pad>", "sot": "<start_of_text>", "eot": "<end_of_text>",
                    "unk": "<unk>"}
# Names tried, in order, when a tokenizer.json comes without our sidecar file.
_CANDIDATES = {
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
    "sot": ("<start_of_text>", "<|startoftext|>", "<s>", "<bos>", "[CLS]"),
    "eot": ("<end_of_text>", "<|endoftext|>", "</s>", "<eos>", "[SEP]"),
    "unk": ("<unk>", "[UNK]", "<|unk|>"),
}
_MIN_BYTE_BPE_VOCAB = 256 + len(ROLES)


def clean_text(text: str) -> str:
    """Lower-case and collapse runs of whitespace to one space (applied before encoding)."""
    return " ".join(text.lower().split())


def _resolve_specials(tk: tokenizers.Tokenizer, specials: dict[str, str] | None,
                      source: str) -> dict[str, str]:
    vocab = tk.get_vocab(with_added_tokens=True)
    resolved: dict[str, str] = {}
    for role in ROLES:
        names = [specials[role]] if specials and specials.get(role) else list(_CANDIDATES[role])
        found = next((n for n in names if n in vocab), None)
        if found is not None:
            resolved[role] = found
        elif role != "unk":
            raise ValueError(f"tokenizer {source or '(in memory)'} has no {role} token "
                             f"(looked for {names}); mmpretrain needs pad (id 0), start-of-text "
                             f"and end-of-text tokens")
    return resolved


class Tokenizer:
    """A fast HF tokenizer plus the special tokens mmpretrain needs (pad id 0, sot, eot, unk).

    Picklable (DataLoader workers tokenize), comparable (`==` compares the full tokenizer JSON and
    the special tokens).
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, specials: dict[str, str] | None = None,
                 source: str = "") -> None:
        self._tk = tokenizer
        self._tk.no_truncation()  # we truncate ourselves (keeping eot)
        self._tk.no_padding()
        self._tk.encode_special_tokens = True  # "<pad>" inside a caption is plain text
        self.source = source
        self.specials = _resolve_specials(tokenizer, specials, source)
        ids = {role: tokenizer.token_to_id(name) for role, name in self.specials.items()}
        if ids["pad"] != 0:
            raise ValueError(
                f"tokenizer {source or '(in memory)'}: pad token {self.specials['pad']!r} has id "
                f"{ids['pad']}, but mmpretrain requires pad id 0 — the text model pads captions "
                "with 0 and pools at the last non-zero token, so any other pad id corrupts "
                "pooling. Use a tokenizer whose pad token is id 0 (leave data.tokenizer empty to "
                "fit one on the training captions).")
        self.pad_id, self.sot_id, self.eot_id = ids["pad"], ids["sot"], ids["eot"]
        self.unk_id: int | None = ids.get("unk")
        self._special_ids = frozenset(i for i in ids.values() if i is not None)
        self._vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    @property
    def vocab_size(self) -> int:
        """Rows the token-embedding table needs (largest id + 1)."""
        return self._vocab_size

    def encode(self, texts: list[str], context_length: int) -> torch.Tensor:
        """Token ids (B, context_length) int64: sot, ids, eot, then 0-padding."""
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (sot + eot), got {context_length}")
        encodings = self._tk.encode_batch_fast([clean_text(t) for t in texts],
                                               add_special_tokens=False)
        out = np.zeros((len(texts), context_length), dtype=np.int64)  # (B, L)
        room = context_length - 2
        for row, enc in zip(out, encodings):
            ids = enc.ids
            if not self._special_ids.isdisjoint(ids):
                ids = [i for i in ids if i not in self._special_ids]
            ids = ids[:room]
            row[0] = self.sot_id
            row[1:len(ids) + 1] = ids
            row[len(ids) + 1] = self.eot_id
        return torch.from_numpy(out)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of one row of ids, without special tokens and padding."""
        keep = [int(i) for i in ids if int(i) not in self._special_ids]
        return self._tk.decode(keep, skip_special_tokens=True).strip()

    def to_str(self) -> str:
        """The tokenizer as `tokenizer.json` text."""
        return self._tk.to_str()

    def save(self, directory: str) -> str:
        """Write `tokenizer.json` and `mmpretrain_tokenizer.json` (atomically); return the dir."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, TOKENIZER_FILE)
        tmp = f"{path}.tmp-{os.getpid()}"
        self._tk.save(tmp)
        os.replace(tmp, path)
        sidecar = {f"{role}_token": name for role, name in self.specials.items()}
        sidecar["format"] = 1
        write_json_atomic(os.path.join(directory, SIDECAR_FILE), sidecar)
        return directory

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Tokenizer) and self.specials == other.specials
                and self.to_str() == other.to_str())

    def __getstate__(self) -> dict[str, Any]:
        return {"json": self.to_str(), "specials": self.specials, "source": self.source}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(tokenizers.Tokenizer.from_str(state["json"]),  # type: ignore[misc]
                      state["specials"], state["source"])

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, source={self.source!r})"


def train_tokenizer(captions: Iterable[str], vocab_size: int,
                    out_dir: str | None = None) -> Tokenizer:
    """Fit a byte-level BPE of at most `vocab_size` tokens on `captions` (deterministic).

    Special tokens get ids 0..3 (`<pad>`, `<unk>`, `<start_of_text>`, `<end_of_text>`). The
    result may be smaller than `vocab_size` when the captions have few distinct merges. Saved to
    `out_dir` when given.
    """
    if vocab_size < _MIN_BYTE_BPE_VOCAB:
        raise ValueError(f"vocab_size must be >= {_MIN_BYTE_BPE_VOCAB} for a byte-level BPE "
                         f"(256 bytes + {len(ROLES)} special tokens), got {vocab_size}")
    tk = tokenizers.Tokenizer(models.BPE(unk_token=DEFAULT_SPECIALS["unk"]))
    tk.normalizer = normalizers.Sequence([
        normalizers.NFKC(), normalizers.Lowercase(),
        normalizers.Replace(tokenizers.Regex(r"\s+"), " "), normalizers.Strip()])
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[DEFAULT_SPECIALS[r] for r in ROLES],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    seen = 0

    def counted() -> Iterator[str]:
        nonlocal seen
        for caption in captions:
            seen += 1
            yield clean_text(caption)

    tk.train_from_iterator(counted(), trainer=trainer)
    if seen == 0:
        raise ValueError("train_tokenizer got no captions to fit on")
    tokenizer = Tokenizer(tk, dict(DEFAULT_SPECIALS), source="trained")
    if out_dir:
        tokenizer.save(out_dir)
        tokenizer.source = os.path.join(out_dir, TOKENIZER_FILE)
    return tokenizer


def load_tokenizer(path: str) -> Tokenizer:
    """Load a tokenizer from a directory holding `tokenizer.json` or from the file itself.

    Special tokens come from `mmpretrain_tokenizer.json` next to it when present, else from the
    usual names (`<pad>`/`[PAD]`, `<start_of_text>`/`<|startoftext|>`/`<s>`, ...).
    """
    file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else os.fspath(path)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no tokenizer at {path}: expected a tokenizer.json file or a "
                                "directory containing one")
    try:
        tk = tokenizers.Tokenizer.from_file(file)
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"{file} is not a valid Hugging Face tokenizer.json: {exc}") from exc
    specials = None
    sidecar = os.path.join(os.path.dirname(file), SIDECAR_FILE)
    if os.path.isfile(sidecar):
        with open(sidecar, encoding="utf-8") as f:
            data = json.load(f)
        specials = {role: data[f"{role}_token"] for role in ROLES if data.get(f"{role}_token")}
    return Tokenizer(tk, specials, source=file)


def iter_captions(pattern: str, limit: int | None = None) -> Iterator[str]:
    """Captions (`txt` members, UTF-8) of the shards named by `pattern`, in shard order."""
    count = 0
    for url in expand_pattern(pattern):
        for sample in iter_shard_samples(url):
            text = sample.get("txt")
            if text is None:
                continue
            yield text.decode("utf-8", errors="replace")
            count += 1
            if limit is not None and count >= limit:
                return
