"""`mmpretrain` subcommands. Thin: parse arguments, call library functions."""
from __future__ import annotations

import argparse
import json
import os
import sys

DEMO_CONFIG = "experiments/demo_digits.yaml"


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None,
                   help="YAML config (under configs/ or a path); default: the digits demo")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="dotted overrides, e.g. model.vision.width=384 optim.lr=5e-4")


def _load(args: argparse.Namespace):
    from mmpretrain.config.load import load_config, resolve_config_path

    path = args.config
    if path is None:
        try:
            path = resolve_config_path(DEMO_CONFIG)
        except Exception:  # configs/ not shipped with this install: the schema defaults
            path = None    # are the same demo
    return load_config(path, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or resume) a run."""
    from mmpretrain.engine.trainer import Trainer

    cfg = _load(args)
    trainer = Trainer(cfg)
    summary = trainer.train()
    if trainer.rank == 0:
        print(json.dumps({"summary": summary}))
        if "zeroshot_top1" in summary:
            print(f"zero-shot top-1 accuracy on {summary['zeroshot_samples']} held-out samples: "
                  f"{100 * summary['zeroshot_top1']:.1f}%")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """Print the resolved config (or every key with its documentation)."""
    from mmpretrain.config import schema
    from mmpretrain.config.load import to_yaml

    if args.docs:
        for key, f, owner in schema.iter_fields(schema.ExperimentConfig):
            print(f"{key}: {schema.field_docs(owner).get(f.name, '')}")
        return 0
    print(to_yaml(_load(args)), end="")
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    """Fit a BPE tokenizer on the captions of some shards."""
    from mmpretrain.data.tokenize import iter_captions, train_tokenizer

    tok = train_tokenizer(iter_captions(args.shards), args.vocab_size, args.out)
    print(f"wrote {os.path.join(args.out, 'tokenizer.json')} ({tok.vocab_size} tokens)")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    """Write the bundled digits dataset to shards (once) and print where."""
    from mmpretrain.data.demo import ensure_demo_shards

    demo = ensure_demo_shards(args.cache_dir, args.image_size)
    print(json.dumps({"train": demo.train_pattern, "val": demo.val_pattern}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Consolidate a checkpoint into safetensors (+ a transformers CLIPModel folder)."""
    from mmpretrain.checkpoint.export import ExportError, export

    try:
        report = export(args.source, args.out, dtype=args.dtype, hf=not args.no_hf,
                        trust_checkpoint=args.trust_checkpoint)
    except ExportError as e:
        print(f"mmpretrain export: {e}", file=sys.stderr)
        return 1
    for warning in report.warnings:
        print(f"mmpretrain export: warning: {warning}", file=sys.stderr)
    print(json.dumps({"export": vars(report)}))
    return 0


def cmd_shards(args: argparse.Namespace) -> int:
    """Convert image-caption pairs (folder, CSV/TSV/JSONL, or the demo) to WebDataset shards."""
    from mmpretrain.data.convert import ShardOptions, SourceError, convert_source, format_summary

    opts = ShardOptions(out_dir=args.out, prefix=args.prefix,
                        samples_per_shard=args.samples_per_shard, max_size=args.max_size,
                        quality=args.quality, max_pixels=args.max_pixels or None,
                        workers=args.workers, overwrite=args.overwrite,
                        progress=sys.stderr.isatty() and not args.no_progress)
    try:
        result = convert_source(opts, args.input, args.demo, args.image_column,
                                args.caption_column, args.format, args.demo_split)
    except SourceError as e:
        print(f"mmpretrain shards: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(result))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Check every sample of a shard set against its manifest; non-zero exit on problems."""
    from mmpretrain.data.inspect import format_report, inspect_shards

    try:
        report = inspect_shards(args.shards, args.workers,
                                progress=sys.stderr.isatty() and not args.no_progress)
    except FileNotFoundError as e:
        print(f"mmpretrain inspect: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0 if report["ok"] else 1


def cmd_bench_data(args: argparse.Namespace) -> int:
    """Measure the training data path (decode, crop, tokenize, batch) per DataLoader worker."""
    from mmpretrain.data.bench import bench_data, format_report

    workers = tuple(int(w) for w in args.workers.split(","))
    report = bench_data(args.shards, args.out, workers, args.batch_size, args.image_size,
                        args.context_length, args.batches, args.samples, args.long_side,
                        args.fast_jpeg)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def cmd_bench_attention(args: argparse.Namespace) -> int:
    """Time the Triton attention kernel against SDPA backends and FlexAttention (CUDA only)."""
    import torch

    from mmpretrain.kernels.bench import bench_attention, format_table, write_json

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    try:
        records = bench_attention(args.shapes.split(","), args.impls.split(","), dtype,
                                  args.warmup, args.iters)
    except (RuntimeError, ValueError) as e:
        print(f"mmpretrain bench attention: error: {e}", file=sys.stderr)
        return 2
    print(format_table(records))
    if args.json:
        write_json(records, args.json)
    return 0


def _add_bench_attention_parser(bsub: argparse._SubParsersAction) -> None:
    from mmpretrain.kernels.bench import IMPLS, SHAPES

    b = bsub.add_parser("attention", help="fused Triton attention vs SDPA/Flex (ms, TFLOP/s)")
    b.add_argument("--shapes", default=",".join(SHAPES), help=f"subset of {list(SHAPES)}")
    b.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {list(IMPLS)}")
    b.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    b.add_argument("--warmup", type=int, default=10)
    b.add_argument("--iters", type=int, default=50, help="timed runs; the median is reported")
    b.add_argument("--json", default="", help="also write the records to this JSON file")
    b.set_defaults(func=cmd_bench_attention)


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks on this machine")
    bsub = p.add_subparsers(dest="what", required=True)
    b = bsub.add_parser("data", help="data path samples/s per DataLoader worker")
    b.add_argument("--shards", default="", help="shard pattern to read (default: generate "
                   "photo-like JPEG shards under ~/.cache/mmpretrain or --out)")
    b.add_argument("--out", default="", help="where generated shards go")
    b.add_argument("--samples", type=int, default=3072, help="samples to generate")
    b.add_argument("--long-side", type=int, default=500, help="generated images' long side")
    b.add_argument("--workers", default="1,2", help="worker counts to measure (0: in-process)")
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--image-size", type=int, default=224)
    b.add_argument("--context-length", type=int, default=77)
    b.add_argument("--batches", type=int, default=40, help="timed batches per measurement")
    b.add_argument("--fast-jpeg", action="store_true", help="stream with data.fast_jpeg=true")
    b.add_argument("--json", action="store_true", help="print the report as JSON")
    b.set_defaults(func=cmd_bench_data)
    _add_bench_attention_parser(bsub)


def _add_shards_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shards", help="image-caption pairs -> WebDataset tar shards")
    p.add_argument("input", nargs="?", metavar="INPUT",
                   help="folder of images with same-stem .txt captions, or a .csv/.tsv/.jsonl "
                        "table of image paths (relative to the table) and captions")
    p.add_argument("--out", "-o", required=True, help="output directory")
    p.add_argument("--demo", action="store_true", help="convert the bundled digits dataset")
    p.add_argument("--demo-split", choices=["train", "val", "all"], default="train")
    p.add_argument("--prefix", default="shard", help="shard names: PREFIX-000000.tar ...")
    p.add_argument("--samples-per-shard", type=int, default=1000,
                   help="input item i goes to shard i // N (skipped inputs leave gaps)")
    p.add_argument("--max-size", type=int, default=None,
                   help="shrink so the longer side is at most N px (re-encode as JPEG)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    p.add_argument("--max-pixels", type=int, default=89_478_485,
                   help="skip images with more pixels (0: no limit)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes")
    p.add_argument("--image-column", default=None,
                   help="table column of image paths (default: image, filepath, image_path...)")
    p.add_argument("--caption-column", default=None,
                   help="table column of captions (default: caption, text, title, ...)")
    p.add_argument("--format", choices=["csv", "tsv", "jsonl"], default=None,
                   help="table format (default: from the file extension)")
    p.add_argument("--overwrite", action="store_true",
                   help="rewrite every shard, even ones a previous run completed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_shards)


def _add_inspect_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="validate shards: decode every sample, check manifest")
    p.add_argument("shards", metavar="SHARDS",
                   help="directory with manifest.json, or brace pattern data/x-{000000..000009}"
                        ".tar")
    p.add_argument("--workers", type=int, default=1, help="parallel processes")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_inspect)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `mmpretrain` command."""
    parser = argparse.ArgumentParser(prog="mmpretrain", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("train", help="train or resume a run")
    _config_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("config", help="print the resolved config")
    _config_args(p)
    p.add_argument("--docs", action="store_true", help="list every key with its documentation")
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="action", required=True)
    t = tsub.add_parser("train", help="fit a BPE tokenizer on shard captions")
    t.add_argument("--shards", required=True, help="brace pattern of .tar shards")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--out", required=True, help="output directory")
    t.set_defaults(func=cmd_tokenizer)
    p = sub.add_parser("demo-data", help="write the bundled digits demo dataset to shards")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--image-size", type=int, default=32)
    p.set_defaults(func=cmd_demo_data)
    p = sub.add_parser("export", help="checkpoint -> safetensors + transformers CLIPModel")
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                   help="run directory (newest complete checkpoint) or a step_* directory")
    p.add_argument("out", metavar="OUT", help="output directory")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--no-hf", action="store_true", help="write only model.safetensors")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling of the DeepSpeed files (trusted sources only)")
    p.set_defaults(func=cmd_export)
    _add_shards_parser(sub)
    _add_inspect_parser(sub)
    _add_bench_parser(sub)
    return parser


def _drop_local_rank(argv: list[str]) -> list[str]:
    """Remove `--local_rank=N` / `--local-rank N`, which the `deepspeed` launcher appends (the
    rank is read from the LOCAL_RANK environment variable instead)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        elif not arg.startswith(("--local_rank=", "--local-rank=")):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mmpretrain` console script."""
    from mmpretrain.config.load import ConfigError
    from mmpretrain.engine.errors import NonFiniteTrainingError

    argv = _drop_local_rank(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command is None:  # `mmpretrain` alone: the demo
        args = build_parser().parse_args(["train", *(argv or [])])
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"mmpretrain: config error: {e}", file=sys.stderr)
        return 2
    except NonFiniteTrainingError as e:
        print(f"mmpretrain: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
