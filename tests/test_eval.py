"""Evaluation: retrieval recall, the cross-rank gather, zero-shot classes files, labels by name,
loading saved models, and `mmpretrain eval` on a short digits run (checkpoint and export)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import free_port, run_train
from mmpretrain.checkpoint.load import CheckpointLoadError, build_loaded_model
from mmpretrain.cli import main
from mmpretrain.config.load import load_config
from mmpretrain.data import EvalStream, ensure_demo_shards, iter_shard_captions, load_tokenizer
from mmpretrain.data import read_shard, train_tokenizer, write_shards
from mmpretrain.data.demo import CLASSNAMES, ZEROSHOT_TEMPLATES
from mmpretrain.data.evalstream import sample_captions
from mmpretrain.eval import EvalSetupError
from mmpretrain.eval.retrieval import gather_features, recall_at_k
from mmpretrain.eval.setup import InferenceTask, run_evals, zeroshot_set
from mmpretrain.eval.zeroshot import load_classes_file
from mmpretrain.model import build_model

DEMO = "experiments/demo_digits.yaml"
# Similarities of 6 captions (rows) to 4 images (columns); no ties in any row or column.
SIMS = [[0.90, 0.10, 0.20, 0.30],   # caption 0 of image 0: its image ranks 1st
        [0.50, 0.80, 0.60, 0.40],   # caption 1 of image 0: 3rd
        [0.70, 0.35, 0.45, 0.55],   # caption 0 of image 1: 4th
        [0.15, 0.25, 0.12, 0.05],   # caption 0 of image 2: 3rd
        [0.65, 0.75, 0.95, 0.85],   # caption 1 of image 2: 1st
        [0.22, 0.32, 0.42, 0.52]]   # caption 0 of image 3: 1st
OWNERS = [0, 0, 1, 2, 2, 3]


# ---- recall@K ------------------------------------------------------------------------------
def test_recall_hand_made_case_with_several_captions() -> None:
    images, texts = torch.eye(4), torch.tensor(SIMS)  # texts @ images.T == SIMS
    got = recall_at_k(images, texts, torch.tensor(OWNERS), ks=(1, 2, 3, 10))
    # text->image ranks 1, 3, 4, 3, 1, 1; k=10 is clamped to the 4 images.
    assert [got[f"retrieval_t2i_r{k}"] for k in (1, 2, 3, 10)] == [3 / 6, 3 / 6, 5 / 6, 1.0]
    # image->text, best caption: image 0 1st, image 1 3rd, image 2 1st through its SECOND
    # caption (its first ranks 6th), image 3 3rd.
    assert [got[f"retrieval_i2t_r{k}"] for k in (1, 2, 3, 10)] == [0.5, 0.5, 1.0, 1.0]
    assert got["retrieval_images"] == 4 and got["retrieval_texts"] == 6
    default = recall_at_k(images, texts, torch.tensor(OWNERS))
    assert sorted(default) == sorted([f"retrieval_{d}_r{k}" for d in ("i2t", "t2i")
                                      for k in (1, 5, 10)] + ["retrieval_images",
                                                              "retrieval_texts"])
    assert default["retrieval_t2i_r1"] == 0.5 and default["retrieval_i2t_r1"] == 0.5
    # A permutation of the captions changes nothing.
    perm = torch.tensor([5, 3, 0, 4, 1, 2])
    assert recall_at_k(images, texts[perm], torch.tensor(OWNERS)[perm], (1, 2, 3, 10)) == got


def test_recall_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="no caption"):
        recall_at_k(torch.eye(4), torch.eye(4)[:3], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="outside"):
        recall_at_k(torch.eye(2), torch.eye(2), torch.tensor([0, 2]))


# ---- two ranks over gloo equal one ----------------------------------------------------------
def _synthetic_set() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """7 images, 1-3 captions each (an image's captions sit next to it in feature space)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(7, 16, generator=gen), dim=-1)
    owners = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5, 6])
    texts = images[owners] + 0.05 * torch.randn(len(owners), 16, generator=gen)
    return images, texts, owners


def _rank_results(rank: int, world: int, cache: str, tok_dir: str) -> dict:
    images, texts, owners = _synthetic_set()
    split = 4 if world == 2 else 7  # rank 0: images 0-3 (7 captions), rank 1: 4-6 (4)
    mine = slice(0, split) if rank == 0 else slice(split, 7)
    keep = (owners >= mine.start) & (owners < mine.stop)
    gathered = gather_features(images[mine], texts[keep], owners[keep] - mine.start)
    cfg = load_config(DEMO, [f"data.cache_dir={cache}", "data.num_workers=0",
                             "eval.batch_size=50", "eval.zeroshot=none"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    task = InferenceTask(model, cfg.data.mean, cfg.data.std)
    metrics = run_evals(cfg, task, load_tokenizer(tok_dir), rank, world, torch.device("cpu"))
    return {"gathered": [t.tolist() for t in gathered], "synthetic": recall_at_k(*gathered),
            "demo": metrics}


def _rank_main(rank: int, world: int, port: int, cache: str, tok_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        result = _rank_results(rank, world, cache, tok_dir)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(cache dir with the 16 px demo shards, dir of a tokenizer fitted on its captions)."""
    root = tmp_path_factory.mktemp("demo")
    demo = ensure_demo_shards(str(root / "cache"), 16)
    train_tokenizer(iter_shard_captions(demo.train_pattern), 1024, str(root / "tok"))
    return str(root / "cache"), str(root / "tok")


def test_two_rank_gather_equals_one_rank(demo_cache: tuple[str, str], tmp_path: Path) -> None:
    # fork: the ranks start in a second instead of importing torch again on a busy machine
    mp.start_processes(_rank_main, args=(2, free_port(), *demo_cache, str(tmp_path)), nprocs=2,
                       start_method="fork")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = _rank_results(0, 1, *demo_cache)
    images, texts, owners = _synthetic_set()
    for got in ranks:
        assert got["gathered"][2] == owners.tolist()  # offsets by the lower ranks' images
        assert torch.allclose(torch.tensor(got["gathered"][0]), images)
        assert torch.allclose(torch.tensor(got["gathered"][1]), texts)
        assert got["synthetic"] == single["synthetic"]
        assert got["synthetic"]["retrieval_i2t_r1"] == 1.0 == got["synthetic"]["retrieval_t2i_r1"]
        # The demo's 297 held-out samples: shard 0 (200) on rank 0, shard 1 (97) on rank 1.
        assert got["demo"]["retrieval_images"] == 297 == got["demo"]["retrieval_texts"]
        assert got["demo"] == pytest.approx(single["demo"], abs=1e-9)


# ---- zero-shot classes files and labels -----------------------------------------------------
def test_classes_file_validation(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("classnames: [cat, dog]\ntemplates: ['a photo of a {}.', '{}']\n")
    assert load_classes_file(good) == (["cat", "dog"], ["a photo of a {}.", "{}"])
    as_json = tmp_path / "good.json"
    as_json.write_text(json.dumps({"classnames": ["cat"], "templates": ["a {}"]}))
    assert load_classes_file(as_json) == (["cat"], ["a {}"])
    cases = {
        "classnames: [cat]\n": r"bad\.yaml: `templates` must be a non-empty list",
        "classnames: [cat, 3]\ntemplates: ['{}']\n": r"`classnames\[1\]` must be a non-empty",
        "classnames: [cat, cat]\ntemplates: ['{}']\n": r"`classnames\[1\]` 'cat' repeats",
        "classnames: [cat]\ntemplates: ['a {}', 'a {} or {}']\n": r"`templates\[1\]`.*exactly one",
        "classnames: [cat]\ntemplates: ['a {name}']\n": r"`templates\[0\]`",
        "classnames: [cat]\ntemplates: ['{}']\nlabels: [0]\n": r"unknown key\(s\) \['labels'\]",
        "- cat\n": "expected a mapping",
        "classnames: [cat\n": "cannot parse",
    }
    for text, message in cases.items():
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(EvalSetupError, match=message):
            load_classes_file(tmp_path / "bad.yaml")
    with pytest.raises(FileNotFoundError, match="eval.zeroshot.*missing.yaml"):
        load_classes_file(tmp_path / "missing.yaml")
    cfg = load_config(None, ["data.source=synthetic", f"eval.zeroshot={good}"])
    with pytest.raises(EvalSetupError, match="eval.zeroshot_shards and data.val_shards are empty"):
        zeroshot_set(cfg)
    cfg.data.val_shards = "val-{0..1}.tar"
    assert zeroshot_set(cfg).pattern == "val-{0..1}.tar"
    cfg.eval.zeroshot_shards = "labelled.tar"
    assert zeroshot_set(cfg).classnames == ["cat", "dog"]
    assert zeroshot_set(cfg).pattern == "labelled.tar"


def _iter_pattern(pattern: str):
    from mmpretrain.data.shardlist import expand_pattern

    for url in expand_pattern(pattern):
        yield from read_shard(url)


def _named_samples(val_pattern: str):
    """Demo held-out samples relabelled: even ones by class index, odd ones by class name; two
    captions each in json `captions` and no `txt`."""
    for i, s in enumerate(_iter_pattern(val_pattern)):
        meta = json.loads(s["json"])
        name, txt = meta["classname"], s["txt"].decode()
        yield {"__key__": s["__key__"], "jpg": s["jpg"],
               "json": {"label": meta["label"] if i % 2 == 0 else name,
                        "captions": [txt, f"the number {name}"]}}


def test_labels_by_name_and_captions_list(demo_cache: tuple[str, str], tmp_path: Path) -> None:
    cache, tok_dir = demo_cache
    demo = ensure_demo_shards(cache, 16)
    write_shards(_named_samples(demo.val_pattern), str(tmp_path / "named"), "named", 150)
    cfg = load_config(DEMO, ["data.num_workers=0"])
    tok = load_tokenizer(tok_dir)
    labels, captions = [], []
    for batch in EvalStream(str(tmp_path / "named" / "named-{000000..000001}.tar"), tok, cfg,
                            batch_size=100, classnames=CLASSNAMES):
        labels += batch["labels"].tolist()
        captions += batch["captions"]
        assert torch.equal(batch["tokens"], tok.encode([c[0] for c in batch["captions"]], 16))
    expected = [json.loads(s["json"])["label"] for s in _iter_pattern(demo.val_pattern)]
    assert labels == expected and len(captions) == 297
    assert all(len(c) == 2 and c[1].startswith("the number ") for c in captions)
    jpg = next(_iter_pattern(demo.val_pattern))["jpg"]
    bad = [{"__key__": "odd-one", "jpg": jpg, "txt": "x", "json": {"label": "eleven"}}]
    write_shards(bad, str(tmp_path / "bad"), "bad", 10)
    with pytest.raises(ValueError, match="odd-one.*'eleven'"):
        list(EvalStream(str(tmp_path / "bad" / "bad-000000.tar"), tok, cfg,
                        classnames=CLASSNAMES))
    with pytest.raises(ValueError, match="sample k1 .*`captions` must be"):
        sample_captions({"__key__": "k1", "json": b'{"captions": ["ok", 3]}'})


def test_strict_load_names_missing_and_unexpected_keys() -> None:
    cfg = load_config(DEMO)
    state = build_model(cfg.model).state_dict()
    state.pop("logit_scale")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointLoadError, match=r"ckpt-x.*missing keys \['logit_scale'\].*"
                                                  r"unexpected keys \['extra.weight'\]"):
        build_loaded_model(cfg, state, "ckpt-x")


# ---- mmpretrain eval on a short digits run --------------------------------------------------
@pytest.fixture(scope="module")
def trained(demo_cache: tuple[str, str], tmp_path_factory: pytest.TempPathFactory):
    """A 5-step digits run (its end-of-training evaluation included) and its stdout."""
    root = tmp_path_factory.mktemp("runs")
    proc = run_train([f"output_dir={root}", "name=digits", "optim.steps=5", "checkpoint.every=0",
                      f"data.cache_dir={demo_cache[0]}", "logging.wandb_mode=disabled",
                      "logging.log_every=5", "eval.batch_size=100"], config=DEMO)
    return root / "digits", proc.stdout


def _eval_record(run_dir: Path) -> dict:
    from mmpretrain.logging.metrics import read_jsonl

    return next(r for r in read_jsonl(run_dir / "metrics.jsonl") if "retrieval_i2t_r1" in r)


def test_training_logs_retrieval(trained) -> None:
    run_dir, stdout = trained
    record = _eval_record(run_dir)
    assert record["step"] == 5 and record["retrieval_images"] == 297
    assert record["zeroshot_samples"] == 297 and 0 <= record["retrieval_t2i_r10"] <= 1
    assert "retrieval on 297 images / 297 captions: image->text R@1" in stdout


def test_eval_cli_on_checkpoint_dir(trained, tmp_path: Path, capsys) -> None:
    run_dir, _ = trained
    ckpt = run_dir / "checkpoints" / "step_00000005"
    metrics_file = tmp_path / "evals" / "metrics.jsonl"
    assert main(["eval", "--checkpoint", str(ckpt), "--metrics", str(metrics_file),
                 "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {ckpt} (step 5)" in out
    assert "zero-shot top-1 accuracy on 297 held-out samples" in out
    assert "retrieval on 297 images / 297 captions" in out
    (record,) = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    assert record["checkpoint"] == str(ckpt) and record["step"] == 5
    trainer = _eval_record(run_dir)
    for key, value in trainer.items():  # the same numbers as the trainer's own evaluation
        if key != "step":
            assert record[key] == pytest.approx(value, abs=1e-9), key
    assert main(["eval", "--checkpoint", str(run_dir), "--json", "--workers", "0",
                 "--metrics", str(metrics_file)]) == 0  # a run dir: its newest checkpoint
    printed = json.loads(capsys.readouterr().out)
    assert printed["checkpoint"] == str(ckpt) and printed["zeroshot_top1"] == record[
        "zeroshot_top1"]
    assert len(metrics_file.read_text().splitlines()) == 2  # appended


def test_eval_cli_on_export_dir_with_classes_file(trained, demo_cache, tmp_path: Path,
                                                  capsys) -> None:
    from mmpretrain.checkpoint.export import export

    run_dir, _ = trained
    export(run_dir, tmp_path / "export")
    capsys.readouterr()  # DeepSpeed's import logs a line to stdout
    classes = tmp_path / "digits.json"
    classes.write_text(json.dumps({"classnames": CLASSNAMES, "templates": ZEROSHOT_TEMPLATES}))
    named = tmp_path / "named"
    write_shards(_named_samples(ensure_demo_shards(demo_cache[0], 16).val_pattern), str(named),
                 "named", 150)
    pattern = str(named / "named-{000000..000001}.tar")
    assert main(["eval", "--checkpoint", str(tmp_path / "export"), "--json", "--workers", "0",
                 "--zeroshot", str(classes), "--zeroshot-data", pattern, "--data", pattern]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["kind"] == "export" and record["step"] == 5
    assert record["retrieval_images"] == 297 and record["retrieval_texts"] == 2 * 297
    trainer = _eval_record(run_dir)  # same images and prompts, labels given by index or name
    assert record["zeroshot_top1"] == pytest.approx(trainer["zeroshot_top1"], abs=1e-9)
    assert record["zeroshot_top5"] == pytest.approx(trainer["zeroshot_top5"], abs=1e-9)


def test_eval_cli_missing_paths_exit_2(trained, tmp_path: Path, capsys) -> None:
    assert main(["eval", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "nope does not exist" in capsys.readouterr().err
    run_dir, _ = trained
    assert main(["eval", "--checkpoint", str(run_dir), "--zeroshot",
                 str(tmp_path / "classes.yaml")]) == 2
    assert "classes.yaml does not exist" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run_dir), "--data",
                 str(tmp_path / "val-{000..001}.tar")]) == 2
    assert "val-000.tar does not exist" in capsys.readouterr().err
