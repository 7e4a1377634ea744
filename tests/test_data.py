"""CPU tests of mmpretrain.data: shards, demo set, tokenizer, decode, streams and exact resume."""
from __future__ import annotations

import io
import itertools
import json
import multiprocessing as mp
import os

import numpy as np
import pytest
import tokenizers
import torch
from PIL import Image

from mmpretrain.config.schema import ExperimentConfig
from mmpretrain.data import (EvalStream, ShardWriter, SyntheticStream, Tokenizer, TrainStream,
                             build_train_stream, ensure_demo_shards, iter_captions,
                             load_tokenizer, normalize, prepare_tokenizer, read_manifest,
                             train_tokenizer, write_shards)
from mmpretrain.data.decode import decode_rgb, eval_transform, train_transform
from mmpretrain.data.pipeline import _TrainShardDataset, epoch_shards, resolve_shards
from mmpretrain.data.shards import iter_shard_samples
from mmpretrain.data.synthetic import EOT_ID, FIRST_REGULAR_ID, SOT_ID

SHARD_SIZES = [7, 13, 9, 20, 11, 5, 16, 8]  # uneven on purpose (89 samples)
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]


def _image_bytes(rng: np.random.Generator, i: int) -> bytes:
    h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
    pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    img, buf = Image.fromarray(pixels), io.BytesIO()
    if i % 5 == 3:
        img.convert("L").save(buf, format="JPEG")  # grayscale JPEG
    elif i % 5 == 4:
        img.convert("RGBA").save(buf, format="PNG")  # PNG with alpha under a .jpg name
    else:
        img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_uneven(directory: str) -> str:
    rng = np.random.default_rng(0)
    for shard, size in enumerate(SHARD_SIZES):
        samples = [{"__key__": f"s{shard}-{i:03d}", "jpg": _image_bytes(rng, i),
                    "txt": f"A {COLORS[(shard + i) % 6]} square, number {i}",
                    "json": {"label": i % 3}} for i in range(size)]
        write_shards(samples, directory, prefix=f"part{shard}", samples_per_shard=100)
    os.remove(os.path.join(directory, "manifest.json"))  # mixed prefixes: counts from the tars
    return os.path.join(directory, "part{0..7}-000000.tar")


def _cfg(workers: int = 2) -> ExperimentConfig:
    cfg = ExperimentConfig(seed=3)
    cfg.data.batch_size, cfg.data.num_workers, cfg.data.shuffle_buffer = 4, workers, 8
    cfg.model.vision.image_size, cfg.model.text.context_length = 16, 16
    return cfg


def _take(stream, n: int) -> list[dict]:
    it = iter(stream)
    out = list(itertools.islice(it, n))
    it.close()  # shuts the DataLoader workers down
    return out


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> str:
    return _write_uneven(str(tmp_path_factory.mktemp("uneven")))


@pytest.fixture(scope="module")
def tok(uneven) -> Tokenizer:
    return train_tokenizer(iter_captions(uneven), 300)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_demo_shards(str(tmp_path_factory.mktemp("cache")), 32)


# ---------------------------------------------------------------- shards and demo


def test_shard_writer_atomic_and_manifest(tmp_path) -> None:
    samples = [{"__key__": f"k{i}", "jpg": b"x" * i, "txt": "t", "json": {"i": i}}
               for i in range(10)]
    manifest = write_shards(samples, str(tmp_path), "p", samples_per_shard=4)
    assert [s["samples"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["total_samples"] == 10 and manifest["pattern"] == "p-{000000..000002}.tar"
    assert read_manifest(str(tmp_path)) == manifest
    assert read_manifest(str(tmp_path / manifest["pattern"])) == manifest
    assert sorted(os.listdir(tmp_path)) == ["manifest.json", "p-000000.tar", "p-000001.tar",
                                            "p-000002.tar"]
    got = list(iter_shard_samples(str(tmp_path / "p-000001.tar")))
    assert [s["__key__"] for s in got] == ["k4", "k5", "k6", "k7"]
    assert json.loads(got[0]["json"]) == {"i": 4} and got[0]["txt"] == b"t"
    with pytest.raises(RuntimeError), ShardWriter(str(tmp_path / "bad"), "q", 2) as writer:
        writer.write(samples[0])
        raise RuntimeError("boom")
    assert os.listdir(tmp_path / "bad") == []  # no partial shard, no manifest
    with pytest.raises(ValueError, match="contains '.'"):
        write_shards([{"__key__": "a.b", "txt": "x"}], str(tmp_path / "dot"))


def test_shards_readable_by_webdataset(tmp_path) -> None:
    wds = pytest.importorskip("webdataset")
    write_shards([{"__key__": f"k{i}", "txt": f"c{i}"} for i in range(3)], str(tmp_path), "w")
    keys = [s["__key__"] for s in wds.WebDataset(str(tmp_path / "w-000000.tar"),
                                                  shardshuffle=False)]
    assert keys == ["k0", "k1", "k2"]


def test_demo_shards(demo) -> None:
    train, val = read_manifest(demo.train_pattern), read_manifest(demo.val_pattern)
    assert train["total_samples"] + val["total_samples"] == 1797
    assert (demo.num_train, demo.num_val) == (train["total_samples"], val["total_samples"])
    assert train["num_shards"] >= 6 and all(s["samples"] <= 250 for s in train["shards"])
    assert demo.classnames[7] == "seven" and "{}" in demo.templates[0]
    sample = next(iter_shard_samples(resolve_shards(demo.train_pattern)[0].url))
    meta = json.loads(sample["json"])
    assert decode_rgb(sample["jpg"]).shape == (32, 32, 3)
    assert demo.classnames[meta["label"]] in sample["txt"].decode()
    assert ensure_demo_shards(os.path.dirname(demo.root), 32) == demo  # reused


def _race(cache: str, queue) -> None:
    queue.put(ensure_demo_shards(cache, 16).train_pattern)


def test_demo_concurrent_writers(tmp_path) -> None:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    patterns = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert patterns[0] == patterns[1]
    assert os.listdir(tmp_path) == ["demo-digits-16"]  # no temporary leftovers
    assert read_manifest(patterns[0])["total_samples"] == 1500


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_roundtrip(tok, tmp_path) -> None:
    rows = tok.encode(["A  Red square,\nnumber 3", "", "red " * 40], 16)
    assert rows.dtype == torch.int64 and rows.shape == (3, 16)
    assert (rows[:, 0] == tok.sot_id).all() and tok.pad_id == 0
    length = int((rows[0] != 0).sum())
    assert rows[0, length - 1] == tok.eot_id and (rows[0, length:] == 0).all()
    assert rows[1, :3].tolist() == [tok.sot_id, tok.eot_id, 0]
    assert rows[2, -1] == tok.eot_id and (rows[2] != 0).all()  # truncated, eot kept
    assert tok.decode(rows[0]) == "a red square, number 3"
    inside = tok.encode(["<pad> <end_of_text> red"], 16)[0]  # special names are plain text
    assert int((inside != 0).sum()) == int((inside != 0).cumprod(0).sum())
    assert int((inside == tok.eot_id).sum()) == 1
    tok.save(str(tmp_path / "t"))
    assert load_tokenizer(str(tmp_path / "t")) == tok
    assert load_tokenizer(str(tmp_path / "t" / "tokenizer.json")) == tok
    assert train_tokenizer(iter_captions_list(), 300) == train_tokenizer(iter_captions_list(), 300)


def iter_captions_list() -> list[str]:
    return [f"a {c} square number {i}" for i in range(30) for c in COLORS]


def test_tokenizer_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_tokenizer(str(tmp_path / "bad.json"))
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {"hello": 0, "<pad>": 1, "<start_of_text>": 2, "<end_of_text>": 3}, unk_token="hello"))
    with pytest.raises(ValueError, match="pad id 0"):
        Tokenizer(tk)


def test_prepare_tokenizer(demo, tmp_path) -> None:
    cfg = ExperimentConfig()
    cfg.data.cache_dir = os.path.dirname(demo.root)
    fitted = prepare_tokenizer(cfg, str(tmp_path))
    assert os.path.isfile(tmp_path / "tokenizer" / "tokenizer.json")
    assert fitted.vocab_size <= cfg.model.text.vocab_size
    assert prepare_tokenizer(cfg, str(tmp_path)) == fitted  # resumed run: loaded, not refit
    cfg.data.source = "synthetic"
    assert prepare_tokenizer(cfg, str(tmp_path)) is None


# ---------------------------------------------------------------- decode


def test_decode_and_transforms() -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    for mode in ("RGB", "L", "CMYK"):
        buf = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(buf, format="JPEG")
        assert decode_rgb(buf.getvalue()).shape == (30, 50, 3)
    with pytest.raises(ValueError, match="cannot decode"):
        decode_rgb(b"not an image")
    a = train_transform(pixels, 24, 0.5, np.random.default_rng(7))
    b = train_transform(pixels, 24, 0.5, np.random.default_rng(7))
    assert a.dtype == torch.uint8 and a.shape == (3, 24, 24) and torch.equal(a, b)
    assert eval_transform(pixels, 20).shape == (3, 20, 20)
    x = normalize(torch.full((2, 3, 4, 4), 255, dtype=torch.uint8), [0.5] * 3, [0.25] * 3)
    assert torch.allclose(x, torch.full_like(x, 2.0))


# ---------------------------------------------------------------- training stream


def test_equal_batches_per_slot(uneven, tok) -> None:
    cfg = _cfg(workers=2)
    shards = resolve_shards(uneven)
    assert [s.samples for s in shards] == SHARD_SIZES
    per_rank = [TrainStream(cfg, tok, rank, 2, pattern=uneven) for rank in (0, 1)]
    per_slot = per_rank[0].batches_per_slot
    assert per_slot == (5 + 7) // 4 and per_rank[1].batches_per_slot == per_slot
    for epoch in range(3):  # every slot yields the same count in every epoch
        for slot in range(4):
            ds = _TrainShardDataset(per_rank[0].spec, shards, tok, 0, 2, 2, per_slot, 0)
            assert sum(1 for _ in ds._epoch(slot, epoch, 0)) == per_slot
    members = {s.url: {x["__key__"] for x in iter_shard_samples(s.url)} for s in shards}
    seen: list[str] = []
    for rank, stream in enumerate(per_rank):
        bpe = stream.batches_per_epoch
        batches = _take(stream, 2 * bpe)
        for i, batch in enumerate(batches):  # batch i of an epoch comes from worker i % 2
            epoch, slot = i // bpe, rank * 2 + (i % bpe) % 2
            allowed = set().union(*(members[s.url] for s in epoch_shards(
                shards, cfg.seed, epoch, slot, 4)))
            assert set(batch["keys"]) <= allowed
            assert batch["image"].shape == (4, 3, 16, 16) and batch["tokens"].shape == (4, 16)
        seen += [k for b in batches[:bpe] for k in b["keys"]]
    assert len(seen) == len(set(seen)) == 2 * 2 * per_slot * 4  # no sample twice in an epoch


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["tokens"], y["tokens"])


@pytest.mark.parametrize("workers,cut", [(2, 3), (2, 6), (0, 5)])
def test_exact_resume(uneven, tok, workers, cut) -> None:
    cfg = _cfg(workers)
    reference = TrainStream(cfg, tok, 1, 2, pattern=uneven)
    bpe = reference.batches_per_epoch
    assert cut <= bpe < cut + 4  # the resumed part crosses an epoch boundary
    expected = _take(reference, cut + 5)
    first = TrainStream(cfg, tok, 1, 2, pattern=uneven)
    _same(_take(first, cut), expected[:cut])  # same config, same batches
    state = first.state_dict()
    assert state["batches"] == cut
    resumed = TrainStream(cfg, tok, 1, 2, pattern=uneven)
    resumed.load_state_dict(state)
    _same(_take(resumed, 5), expected[cut:])
    assert resumed.state_dict()["batches"] == cut + 5


def test_stream_errors(uneven, tok, tmp_path) -> None:
    missing = uneven.replace("{0..7}", "{0..8}")
    with pytest.raises(FileNotFoundError, match="part8-000000.tar"):
        TrainStream(_cfg(), tok, 0, 1, pattern=missing)
    with pytest.raises(ValueError, match="fewer shards|lower data.num_workers"):
        TrainStream(_cfg(workers=3), tok, 0, 3, pattern=uneven)  # 9 readers, 8 shards


def test_eval_stream_covers_every_sample_once(demo, tok) -> None:
    cfg = _cfg(workers=2)
    cfg.model.vision.image_size = 32
    keys, labels = [], []
    for rank in (0, 1):
        stream = EvalStream(demo.val_pattern, tok, cfg, rank, 2, batch_size=64)
        for batch in stream:
            assert batch["image"].shape[1:] == (3, 32, 32)
            keys += batch["keys"]
            labels += batch["labels"].tolist()
    assert len(keys) == len(set(keys)) == 297 and set(labels) == set(range(10))


def test_demo_stream_via_builder(demo, tok) -> None:
    cfg = _cfg(workers=0)
    cfg.data.cache_dir = os.path.dirname(demo.root)
    cfg.model.vision.image_size = 32
    stream = build_train_stream(cfg, tok, 0, 1)
    batch = _take(stream, 1)[0]
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.uint8


def test_synthetic_determinism_and_resume() -> None:
    cfg = _cfg()
    cfg.data.source = "synthetic"
    stream = build_train_stream(cfg, None, 1, 2)
    assert isinstance(stream, SyntheticStream)
    a = list(itertools.islice(iter(stream), 5))
    _same(a, list(itertools.islice(iter(SyntheticStream(cfg, 1, 2)), 5)))
    other = list(itertools.islice(iter(SyntheticStream(cfg, 0, 2)), 1))[0]
    assert not torch.equal(other["image"], a[0]["image"])
    resumed = SyntheticStream(cfg, 1, 2)
    resumed.load_state_dict({"batches": 3})
    _same(list(itertools.islice(iter(resumed), 2)), a[3:])
    tokens = a[0]["tokens"]
    for row in tokens:
        n = int((row != 0).sum())
        assert row[0] == SOT_ID and row[n - 1] == EOT_ID
        assert (row[n:] == 0).all() and (row[:n] != 0).all()
    # the caption's first two tokens name the latent class that the image pattern shows
    labels = a[0]["labels"]
    assert (tokens[:, 1] == FIRST_REGULAR_ID + 2 * labels).all()
    assert (tokens[:, 2] == FIRST_REGULAR_ID + 2 * labels + 1).all()
    assert stream.state_dict()["batches"] == 5
