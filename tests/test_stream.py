"""CPU tests of the training stream: sources (local, pipe:, mixed), epoch and resampled modes,
exact resume with several workers and ranks, bad samples and the error budget."""
from __future__ import annotations

import io
import itertools
import multiprocessing as mp
import os
import socket
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from mmpretrain.config.schema import ExperimentConfig
from mmpretrain.data import (DataErrorBudgetExceeded, ShardReadError, Tokenizer, TrainStream,
                             iter_shard_captions, train_tokenizer, write_shards)
from mmpretrain.data.decode import decode_rgb, decode_train, train_transform

COLORS = ["red", "green", "blue", "yellow"]


def _jpeg(rng: np.random.Generator, side: int = 24) -> bytes:
    pixels = rng.integers(0, 256, size=(side, side + 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _samples(prefix: str, n: int, rng: np.random.Generator) -> list[dict]:
    return [{"__key__": f"{prefix}-{i:03d}", "jpg": _jpeg(rng),
             "txt": f"a {COLORS[i % 4]} thing {i}"} for i in range(n)]


def _write_set(directory: str, prefix: str, shards: int, per_shard: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    write_shards(_samples(prefix, shards * per_shard, rng), directory, prefix, per_shard)
    return os.path.join(directory, f"{prefix}-{{000000..{shards - 1:06d}}}.tar")


def _bad_shard(directory: str, name: str = "bad") -> str:
    """A shard of 8: corrupt JPEG, missing txt, non-UTF-8 txt, 4 good, truncated last member."""
    rng = np.random.default_rng(9)
    samples = _samples(name, 8, rng)
    samples[1]["jpg"] = b"\xff\xd8\xff\xe0 not a jpeg at all"
    del samples[3]["txt"]
    samples[5]["txt"] = b"caf\xe9 \xff\xfe"
    write_shards(samples, directory, name, 100)
    path = os.path.join(directory, f"{name}-000000.tar")
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    os.truncate(path, last.offset_data + last.size // 2)  # cut inside the final member
    os.remove(os.path.join(directory, "manifest.json"))
    return path


def _cfg(workers: int = 2, mode: str = "epoch", **data) -> ExperimentConfig:
    cfg = ExperimentConfig(seed=5)
    cfg.data.batch_size, cfg.data.num_workers, cfg.data.shuffle_buffer = 4, workers, 6
    cfg.data.mode = mode
    cfg.model.vision.image_size, cfg.model.text.context_length = 16, 12
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def _take(stream: TrainStream, n: int, cut: int | None = None) -> tuple[list[dict], dict]:
    """The next `n` batches, and the state after the first `cut` of them."""
    it, out, state = iter(stream), [], {}
    for batch in itertools.islice(it, n):
        out.append(batch)
        if len(out) == cut:
            state = stream.state_dict()
    it.close()  # shuts the DataLoader workers down
    return out, state


def _keys(batches: list[dict]) -> list[list[str]]:
    return [b["keys"] for b in batches]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("stream")
    _bad_shard(str(root / "good"))  # not in the manifest: counted from the tar
    good = _write_set(str(root / "good"), "g", 7, 8)
    mixed_a = _write_set(str(root / "a"), "a", 4, 5, seed=1)
    mixed_b = _write_set(str(root / "b"), "b", 2, 20, seed=2)
    dirty = os.path.join(root, "good", "{g-{000000..000006},bad-000000}.tar")
    return {"root": str(root), "good": good, "dirty": dirty, "a": mixed_a, "b": mixed_b}


@pytest.fixture(scope="module")
def tok(data) -> Tokenizer:
    return train_tokenizer(iter_shard_captions(data["good"]), 300)


@pytest.mark.parametrize("mode,cut", [("epoch", 4), ("resampled", 5)])
def test_exact_resume_two_ranks_two_workers(data, tok, mode, cut) -> None:
    # the cuts fall mid-epoch after batches with skipped bad samples (raw positions matter);
    # the resumed part crosses an epoch boundary
    cfg = _cfg(2, mode, epoch_samples=64)
    for rank in (0, 1):
        reference = TrainStream(cfg, tok, rank, 2, pattern=data["dirty"])
        assert reference.batches_per_epoch == (6 if mode == "epoch" else 8)
        expected, state = _take(reference, cut + 8, cut=cut)
        assert state["batches"] == cut and len(state["per_rank"][str(rank)]["positions"]) == 2
        resumed = TrainStream(cfg, tok, rank, 2, pattern=data["dirty"])
        resumed.load_state_dict(state)
        got, _ = _take(resumed, 8)
        assert _keys(got) == _keys(expected[cut:])
        for x, y in zip(got, expected[cut:]):
            assert torch.equal(x["image"], y["image"]) and torch.equal(x["tokens"], y["tokens"])
        assert resumed.metrics() == reference.metrics()  # counts survive the resume
        assert all("_meta" not in b for b in got)


def _rank_state(rank: int, port: int, pattern: str, tok: Tokenizer, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        stream = TrainStream(_cfg(2, "epoch"), tok, rank, 2, pattern=pattern)
        queue.put((rank, _take(stream, 4, cut=4)[1]))  # state_dict gathers every rank's part
    finally:
        dist.destroy_process_group()


def test_checkpointed_state_carries_every_rank(data, tok) -> None:
    """Checkpoints keep rank 0's client state only: it must hold rank 1's positions too."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_state, args=(r, port, data["dirty"], tok, queue))
             for r in (0, 1)]
    for p in procs:
        p.start()
    states = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert states[0] == states[1] and sorted(states[0]["per_rank"]) == ["0", "1"]
    assert states[0]["per_rank"]["0"]["positions"] == [[0, 11], [0, 8]]  # 3 bad on rank 0
    for rank in (0, 1):
        expected, _ = _take(TrainStream(_cfg(2), tok, rank, 2, pattern=data["dirty"]), 8)
        resumed = TrainStream(_cfg(2), tok, rank, 2, pattern=data["dirty"])
        resumed.load_state_dict(states[0])  # what every rank loads
        assert _keys(_take(resumed, 4)[0]) == _keys(expected[4:])


def test_bad_samples_skipped_counted_equal_batches(data, tok) -> None:
    cfg = _cfg(1, "epoch")
    totals: Counter = Counter()
    for rank in (0, 1):  # 8 shards over 2 slots: every good sample is needed in an epoch
        stream = TrainStream(cfg, tok, rank, 2, pattern=data["dirty"])
        bpe = stream.batches_per_epoch
        assert bpe == (3 * 8 + 7) // 4  # 4 smallest shards: 3 of 8 and the truncated one
        batches, _ = _take(stream, bpe + 1)
        keys = [k for b in batches[:bpe] for k in b["keys"]]
        assert stream.epoch == 1 and len(keys) == bpe * 4  # full batches, no extra, no fewer
        assert not {"bad-001", "bad-003", "bad-005", "bad-007"} & set(keys)
        assert all(b["image"].shape == (4, 3, 16, 16) for b in batches)
        totals.update(stream.metrics())
    for kind in ("corrupt_image", "missing_caption", "bad_caption", "truncated"):
        assert totals[f"data_skipped_{kind}"] >= 1, totals
    assert totals["data_skipped_missing_image"] == 0


def test_error_budget(data, tok, tmp_path) -> None:
    rng = np.random.default_rng(3)
    broken = [{"__key__": f"x{i}", "jpg": b"garbage" + bytes([i]), "txt": "t"} for i in range(8)]
    good = _samples("ok", 8, rng)
    write_shards(broken + good, str(tmp_path), "broken", 100)
    pattern = str(tmp_path / "broken-000000.tar")
    cfg = _cfg(0, "resampled", epoch_samples=64, max_bad_in_a_row=3)
    with pytest.raises(DataErrorBudgetExceeded, match=r"3 bad samples in a row.*broken-000000"):
        _take(TrainStream(cfg, tok, 0, 1, pattern=pattern), 4)
    cfg = _cfg(0, "resampled", epoch_samples=64, max_bad_in_a_row=0, max_bad_fraction=0.002)
    with pytest.raises(DataErrorBudgetExceeded, match=r"max_bad_fraction.*broken-000000.tar, "
                                                      r"sample x\d"):
        _take(TrainStream(cfg, tok, 0, 1, pattern=pattern), 8)


def test_weighted_mixing_proportions(data, tok) -> None:
    # source a: shards of 5 samples, b: shards of 20; the mix must hold in samples regardless
    cfg = _cfg(0, "resampled", epoch_samples=4000, train_weights=[0.7, 0.3], shuffle_buffer=20)
    cfg.data.batch_size = 50
    stream = TrainStream(cfg, tok, 0, 1, pattern=f"{data['a']}::{data['b']}")
    batches, _ = _take(stream, 40)
    counts = Counter(k[0] for b in batches for k in b["keys"])
    share = counts["a"] / (counts["a"] + counts["b"])
    assert abs(share - 0.7) < 0.04, counts
    # without weights the sources mix by size (20 and 40 samples)
    cfg.data.train_weights = []
    stream = TrainStream(cfg, tok, 0, 1, pattern=f"{data['a']}::{data['b']}")
    assert [round(s.weight) for s in stream.sources] == [20, 40]


def test_pipe_source_equals_local(data, tok) -> None:
    good_dir = os.path.join(data["root"], "good")
    local = TrainStream(_cfg(0), tok, 0, 1, pattern=data["good"])
    piped = TrainStream(_cfg(0, train_manifests=[good_dir]), tok, 0, 1,
                        pattern="pipe:cat " + data["good"])
    assert [s.samples for s in piped.shards] == [s.samples for s in local.shards] == [8] * 7
    a, _ = _take(local, 5)
    b, _ = _take(piped, 5)
    assert _keys(a) == _keys(b)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    piped_captions = list(iter_shard_captions("pipe:cat " + data["good"], limit=20))
    assert piped_captions == list(iter_shard_captions(data["good"], limit=20))


def test_pipe_errors(data, tok, tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown.*data.train_manifests.*resampled"):
        TrainStream(_cfg(0), tok, 0, 1, pattern="pipe:cat " + data["good"])
    missing = f"pipe:cat {tmp_path}/nope-{{0..1}}.tar"
    stream = TrainStream(_cfg(0, "resampled", epoch_samples=16), tok, 0, 1, pattern=missing)
    with pytest.raises(ShardReadError, match=r"cat .*nope-[01]\.tar.*exit status 1"):
        _take(stream, 1)


def test_shard_count_checks(data, tok) -> None:
    one = data["good"].replace("{000000..000006}", "000000")
    with pytest.raises(ValueError, match="1 shards cannot feed 4 readers.*data.mode=resampled"):
        TrainStream(_cfg(2), tok, 0, 2, pattern=one)
    stream = TrainStream(_cfg(2, "resampled", epoch_samples=32), tok, 1, 2, pattern=one)
    batches, _ = _take(stream, 3)  # 4 readers share one shard
    assert all(len(b["keys"]) == 4 for b in batches)
    with pytest.raises(ValueError, match="train_weights mixes sources only in"):
        TrainStream(_cfg(0, train_weights=[1.0, 2.0]), tok, 0, 1,
                    pattern=f"{data['a']}::{data['b']}")
    with pytest.raises(ValueError, match="2 weights for 1 sources"):
        TrainStream(_cfg(0, "resampled", train_weights=[1.0, 2.0]), tok, 0, 1, pattern=one)


def test_reduced_size_decode_matches_full() -> None:
    y, x = np.mgrid[0:300, 0:340]
    pixels = np.stack([x * 0.7, y * 0.8, (x + y) * 0.35], -1) % 256
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    diffs = []
    for seed in range(5):  # size 64: every crop of >= 0.8 of the area allows a 1/2 decode
        fast = decode_train(data, 64, 0.8, np.random.default_rng(seed))
        full = train_transform(decode_rgb(data), 64, 0.8, np.random.default_rng(seed))
        assert fast.shape == full.shape == (3, 64, 64) and fast.dtype == torch.uint8
        diffs.append((fast.float() - full.float()).abs().mean().item())
    assert max(diffs) < 3.0, diffs


def test_captions_list_picks_one_caption_per_visit(tok, tmp_path) -> None:
    """json `captions` (COCO-style): each visit of a sample uses one of its captions, drawn by
    the sample's RNG (so resume stays exact); a malformed list is a counted `bad_caption`."""
    import json as _json

    rng = np.random.default_rng(3)
    samples = _samples("c", 16, rng)
    for i, s in enumerate(samples):
        del s["txt"]  # only the list: training used to skip these as missing_caption
        s["json"] = _json.dumps({"captions": [f"a red thing {i}", f"a blue thing {i}",
                                              f"a green thing {i}"]})
    samples[7]["json"] = _json.dumps({"captions": []})  # malformed: counted, skipped
    write_shards(samples, str(tmp_path), "c", 4)
    pattern = os.path.join(str(tmp_path), "c-{000000..000003}.tar")
    stream = TrainStream(_cfg(0, "epoch"), tok, 0, 1, pattern=pattern)
    batches, _ = _take(stream, 3 * stream.batches_per_epoch)
    seen: dict[str, set] = {}
    for b in batches:
        for key, row in zip(b["keys"], b["tokens"]):
            seen.setdefault(key, set()).add(tok.decode(row.tolist()).split()[1])
    assert "c-007" not in seen and stream.metrics()["data_skipped_bad_caption"] >= 1
    assert all(colors <= {"red", "blue", "green"} for colors in seen.values())
    assert len(set().union(*seen.values())) == 3  # every caption of the lists gets used
    again, _ = _take(TrainStream(_cfg(0, "epoch"), tok, 0, 1, pattern=pattern), len(batches))
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(batches, again))


def test_truncated_shard_names_the_partial_sample(tmp_path) -> None:
    from mmpretrain.data.shardlist import TruncatedShard, read_shard

    path = _bad_shard(str(tmp_path))
    with pytest.raises(TruncatedShard) as info:
        list(read_shard(path))
    assert info.value.key == "bad-007" and info.value.url == path
    seen: list[str] = []
    keys = [s["__key__"] for s in read_shard(path, on_truncated=lambda e: seen.append(e.key))]
    assert keys == [f"bad-{i:03d}" for i in range(7)] and seen == ["bad-007"]
