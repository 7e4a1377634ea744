"""`mmpretrain shards` and `mmpretrain inspect`: inputs → shards → validation → the reader."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmpretrain.cli import main
from mmpretrain.data.decode import decode_rgb
from mmpretrain.data.shards import ShardWriter, iter_shard_samples

from helpers import REPO, clean_env

KINDS = ("missing_image", "bad_image", "too_large", "missing_caption", "empty_caption",
         "non_utf8_caption", "bad_row")


def _image_bytes(fmt: str, w: int = 60, h: int = 40, seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _pair(folder: Path, stem: str, data: bytes, ext: str, caption: bytes | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.{ext}").write_bytes(data)
    if caption is not None:
        (folder / f"{stem}.txt").write_bytes(caption)


def _make_folder(root: Path) -> dict[str, str]:
    """8 good pairs (jpg, png, webp, bmp; one subfolder) and one input of each bad kind a
    folder can have. Returns {relative image path: caption} of the good ones."""
    good = {}
    formats = [("JPEG", "jpg", "RGB"), ("PNG", "png", "RGBA"), ("WEBP", "webp", "RGB"),
               ("BMP", "bmp", "L"), ("PNG", "png", "P"), ("JPEG", "jpeg", "L")]
    for i in range(8):
        fmt, ext, mode = formats[i % len(formats)]
        folder = root / "sub" if i >= 5 else root
        _pair(folder, f"good{i}", _image_bytes(fmt, seed=i, mode=mode), ext,
              f"  a picture number {i}\n".encode())
        good[f"{'sub/' if i >= 5 else ''}good{i}.{ext}"] = f"a picture number {i}"
    jpeg = _image_bytes("JPEG", seed=99)
    _pair(root, "bad_truncated", jpeg[: len(jpeg) // 2], "jpg", b"cut in half")
    _pair(root, "bad_garbage", os.urandom(500), "jpg", b"not an image")
    huge = io.BytesIO()
    Image.new("1", (10000, 10000)).save(huge, "PNG")  # 100 Mpx, ~12 KB: over PIL's limit
    _pair(root, "bad_huge", huge.getvalue(), "png", b"a bomb")
    _pair(root, "cap_empty", _image_bytes("JPEG", seed=1), "jpg", b" \n\t")
    _pair(root, "cap_latin1", _image_bytes("JPEG", seed=2), "jpg", "caf\xe9".encode("latin-1"))
    _pair(root, "cap_missing", _image_bytes("JPEG", seed=3), "jpg", None)
    (root / ".hidden").mkdir()
    _pair(root / ".hidden", "ignored", jpeg, "jpg", b"hidden folders are skipped")
    return good


def _samples(out: Path) -> list[dict]:
    samples = []
    for shard in sorted(out.glob("*.tar")):
        samples.extend(iter_shard_samples(str(shard)))
    return samples


def _skipped(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("folder")
    return root, _make_folder(root)


def test_folder_round_trip(folder, tmp_path, capsys) -> None:
    root, good = folder
    out = tmp_path / "out"
    assert main(["shards", str(root), "-o", str(out), "--samples-per-shard", "4",
                 "--prefix", "train", "--no-progress"]) == 0
    summary = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    # 14 inputs (8 good + 6 bad) -> shards of items 0-3, 4-7, 8-11, 12-13
    assert manifest["num_shards"] == 4 and manifest["inputs"]["items"] == 14
    assert manifest["total_samples"] == len(good) == 8
    expected = {"bad_image": 2, "too_large": 1, "missing_caption": 1, "empty_caption": 1,
                "non_utf8_caption": 1}
    assert manifest["inputs"]["skipped_by_kind"] == expected
    skipped = _skipped(out)
    assert {k: sum(e["kind"] == k for e in skipped) for k in expected} == expected
    by_name = {Path(e["source"]).name: e for e in skipped}
    assert by_name["bad_huge.png"]["kind"] == "too_large"
    assert by_name["bad_truncated.jpg"]["kind"] == "bad_image"
    assert "truncated" in by_name["bad_truncated.jpg"]["reason"]
    assert by_name["cap_latin1.jpg"]["kind"] == "non_utf8_caption"
    assert all(e["reason"] and os.path.isabs(e["source"]) for e in skipped)
    assert str(out / "skipped.jsonl") in summary and "1 too_large" in summary
    # every shard's real count is in the manifest; item i sits in shard i // 4
    for entry in manifest["shards"]:
        path = out / entry["name"]
        keys = [s["__key__"] for s in iter_shard_samples(str(path))]
        assert entry["samples"] == len(keys) and entry["bytes"] == path.stat().st_size
        assert all(int(k) // 4 == int(entry["name"][6:12]) for k in keys)
    samples = _samples(out)
    got = {json.loads(s["json"])["source"]: s for s in samples}
    assert {k: s["txt"].decode() for k, s in got.items()} == good
    jpg = got["good0.jpg"]
    assert jpg["jpg"] == (root / "good0.jpg").read_bytes()  # JPEG copied byte for byte
    meta = json.loads(got["good1.png"]["json"])
    assert (meta["width"], meta["height"], meta["format"]) == (60, 40, "PNG")
    for s in samples:  # everything is an RGB JPEG the training decoder reads
        assert s["jpg"][:2] == b"\xff\xd8" and decode_rgb(s["jpg"]).shape == (40, 60, 3)
    assert main(["inspect", str(out), "--no-progress"]) == 0
    assert "8 good, 0 bad" in capsys.readouterr().out


def _write_table(path: Path, kind: str, rows: list[dict]) -> None:
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n\n")
        return
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]),
                                delimiter="\t" if kind == "tsv" else ",")
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl"])
def test_table_inputs(kind, tmp_path, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        (images / f"{i}.png").write_bytes(_image_bytes("PNG", 30, 20, seed=i))
    absolute = str(images / "3.png")
    rows = [{"img": "images/0.png", "desc": "zero", "extra": "x"},
            {"img": "images/1.png", "desc": "one, with a comma", "extra": ""},
            {"img": "images/nope.png", "desc": "missing file", "extra": ""},
            {"img": "images/2.png", "desc": "", "extra": ""},
            {"img": absolute, "desc": "three\tabsolute", "extra": ""}]
    table = tmp_path / f"pairs.{kind}"
    _write_table(table, kind, rows)
    out = tmp_path / "out"
    args = ["shards", str(table), "-o", str(out), "--samples-per-shard", "2", "--no-progress"]
    assert main(args) == 2  # default column names are not in this table
    err = capsys.readouterr().err
    assert str(table) in err and "img" in err and "--image-column" in err
    assert main(args + ["--image-column", "img", "--caption-column", "desc"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    kinds = {"missing_image": 1, "empty_caption": 1}
    if kind == "jsonl":
        kinds["bad_row"] = 1  # the unparsable last line (the blank one is not an input)
    assert manifest["inputs"]["skipped_by_kind"] == kinds
    skipped = _skipped(out)
    missing = next(e for e in skipped if e["kind"] == "missing_image")
    assert missing["source"].endswith("nope.png") and missing["row"] == (4 if kind != "jsonl"
                                                                        else 3)
    samples = _samples(out)
    assert [s["txt"].decode() for s in samples] == ["zero", "one, with a comma",
                                                   "three\tabsolute"]
    metas = [json.loads(s["json"]) for s in samples]
    assert [m["row"] for m in metas] == ([2, 3, 6] if kind != "jsonl" else [1, 2, 5])
    assert metas[2]["source"] == absolute and metas[0]["table"] == table.name


def test_table_fallback_columns_and_bad_bytes(tmp_path) -> None:
    (tmp_path / "a.jpg").write_bytes(_image_bytes("JPEG", seed=5))
    (tmp_path / "pairs.csv").write_bytes(b"filepath,title\na.jpg,fine\na.jpg,caf\xe9\n,no path\n")
    out = tmp_path / "out"
    assert main(["shards", str(tmp_path / "pairs.csv"), "-o", str(out), "--no-progress"]) == 0
    by_kind = {e["kind"]: e for e in _skipped(out)}
    assert set(by_kind) == {"non_utf8_caption", "missing_image"}
    assert by_kind["non_utf8_caption"]["row"] == 3 and by_kind["missing_image"]["row"] == 4
    assert [s["txt"] for s in _samples(out)] == [b"fine"]


def test_max_size_and_pixel_limit(tmp_path) -> None:
    src = tmp_path / "in"
    _pair(src, "wide", _image_bytes("JPEG", 120, 80, seed=1), "jpg", b"wide")
    _pair(src, "tall", _image_bytes("PNG", 40, 100, seed=2), "png", b"tall")
    _pair(src, "small", _image_bytes("JPEG", 20, 10, seed=3), "jpg", b"small")
    _pair(src, "big", _image_bytes("PNG", 200, 200, seed=4), "png", b"over the limit")
    _pair(src, os.fsdecode(b"na\xefve"), _image_bytes("JPEG", 8, 8), "jpg", b"latin-1 name")
    out = tmp_path / "out"
    assert main(["shards", str(src), "-o", str(out), "--max-size", "32", "--quality", "80",
                 "--max-pixels", "20000", "--no-progress"]) == 0
    sizes = {s["txt"].decode(): decode_rgb(s["jpg"]).shape[:2] for s in _samples(out)}
    assert sizes == {"wide": (21, 32), "tall": (32, 13), "small": (10, 20),
                     "latin-1 name": (8, 8)}
    sources = {json.loads(s["json"])["source"] for s in _samples(out)}
    assert "na\ufffdve.jpg" in sources  # a non-UTF-8 file name, stored readably
    small = next(s for s in _samples(out) if s["txt"] == b"small")
    assert small["jpg"] == (src / "small.jpg").read_bytes()  # fits already: copied
    assert [(e["kind"], Path(e["source"]).name) for e in _skipped(out)] == [
        ("too_large", "big.png")]


def test_rerun_skips_complete_shards_and_cleans_tmp(folder, tmp_path, capsys) -> None:
    root, _ = folder
    out = tmp_path / "out"
    args = ["shards", str(root), "-o", str(out), "--samples-per-shard", "4", "--no-progress"]
    assert main(args) == 0
    shards = sorted(out.glob("*.tar"))
    original = {p.name: p.read_bytes() for p in shards}
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards}
    assert main(args) == 0
    assert "0 written, 4 already complete" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in shards} == mtimes
    # a crash while writing shard 1 (only its .tmp left) and a damaged shard 2
    shards[1].unlink()
    (out / (shards[1].name + ".tmp")).write_bytes(b"partial")
    with open(shards[2], "r+b") as f:
        f.truncate(1000)
    assert main(args) == 0
    assert "2 written, 2 already complete" in capsys.readouterr().out
    assert not list(out.glob("*.tmp"))
    assert {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))} == original
    for p in (shards[0], shards[3]):
        assert p.stat().st_mtime_ns == mtimes[p.name]
    assert len(_skipped(out)) == 6  # skipped inputs of reused shards are still listed


def test_workers_give_identical_output(folder, tmp_path) -> None:
    root, _ = folder
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        assert main(["shards", str(root), "-o", str(out), "--samples-per-shard", "3",
                     "--workers", str(workers), "--no-progress"]) == 0
        outputs.append({p.name: p.read_bytes() for p in out.iterdir() if p.is_file()})
    assert outputs[0] == outputs[1] and len(outputs[0]) == 5 + 2  # shards, manifest, skipped


def _good_set(tmp_path: Path) -> Path:
    out = tmp_path / "set"
    with ShardWriter(str(out), "s", 3) as writer:
        for i in range(7):
            writer.write({"__key__": f"k{i}", "jpg": _image_bytes("JPEG", 16, 12, seed=i),
                          "txt": f"caption number {i}", "json": {"i": i}})
    return out


def test_inspect_good_and_bad_sets(tmp_path, capsys) -> None:
    out = _good_set(tmp_path)
    assert main(["inspect", str(out / "s-{000000..000002}.tar"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["total_samples"] == 7 and report["num_shards"] == 3
    assert report["stats"]["width"] == {"min": 16, "median": 16.0, "max": 16}
    assert report["stats"]["caption_words"] == {"min": 3, "mean": 3.0, "max": 3}

    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][1]["samples"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert main(["inspect", str(out)]) == 1
    assert "s-000001.tar: 3 samples but the manifest says 4" in capsys.readouterr().out

    out = _good_set(tmp_path / "b")
    shard = out / "s-000000.tar"
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        boundary = tar.getmembers()[3].offset  # where the second sample starts
    shard.write_bytes(data[:boundary + 700])  # cut inside a member
    assert main(["inspect", str(out)]) == 1
    text = capsys.readouterr().out
    assert "s-000000.tar" in text and "truncated" in text and "FAILED" in text
    shard.write_bytes(data[:boundary])  # cut between members: no end-of-archive marker
    assert main(["inspect", str(shard)]) == 1
    assert "end-of-archive" in capsys.readouterr().out

    out = _good_set(tmp_path / "c")
    (out / "s-000002.tar").unlink()
    assert main(["inspect", str(out)]) == 1
    assert "listed in the manifest but missing" in capsys.readouterr().out


def test_inspect_lists_bad_samples(tmp_path, capsys) -> None:
    out = tmp_path / "bad"
    with ShardWriter(str(out), "x", 10) as writer:
        writer.write({"__key__": "ok", "jpg": _image_bytes("JPEG"), "txt": "fine"})
        writer.write({"__key__": "junk", "jpg": b"\xff\xd8garbage", "txt": "fine"})
        writer.write({"__key__": "blank", "jpg": _image_bytes("JPEG"), "txt": "  "})
        writer.write({"__key__": "latin", "jpg": _image_bytes("JPEG"), "txt": b"caf\xe9"})
        writer.write({"__key__": "noimg", "txt": "no image"})
    assert main(["inspect", str(out), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    reasons = {b["key"]: b["reason"] for b in report["bad_samples"]}
    assert set(reasons) == {"junk", "blank", "latin", "noimg"} and not report["errors"]
    assert "does not decode" in reasons["junk"] and "empty" in reasons["blank"]
    assert "UTF-8" in reasons["latin"] and "no image" in reasons["noimg"]
    assert report["good_samples"] == 1
    assert main(["inspect", str(tmp_path / "nothing")]) == 2


def test_demo_via_subprocess(tmp_path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "mmpretrain.cli", "shards", "--demo",
                           "--demo-split", "val", "-o", str(out), "--max-size", "16",
                           "--samples-per-shard", "100"], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "holding 297 samples" in proc.stdout and "skipped no inputs" in proc.stdout
    samples = _samples(out)
    assert len(samples) == 297 and decode_rgb(samples[0]["jpg"]).shape == (16, 16, 3)
    meta = json.loads(samples[0]["json"])
    assert meta["split"] == "val" and meta["classname"] in samples[0]["txt"].decode()
    shutil.rmtree(out / ".shards")  # no records: everything is rewritten, identically
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    assert main(["shards", "--demo", "--demo-split", "val", "-o", str(out), "--max-size", "16",
                 "--samples-per-shard", "100", "--no-progress"]) == 0
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before
