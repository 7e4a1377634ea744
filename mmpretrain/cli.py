"""`mmpretrain` subcommands. Thin: parse arguments, call library functions."""
from __future__ import annotations

import argparse
import json
import os
import sys

from mmpretrain.bench_cli import add_bench_parser

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
    import torch

    from mmpretrain.engine.trainer import Trainer

    cfg = _load(args)
    try:
        trainer = Trainer(cfg)
        summary = trainer.train()
    except torch.OutOfMemoryError as e:
        _explain_oom(cfg, e)
        return 3
    if trainer.rank == 0:
        print(json.dumps({"summary": summary}))
        if "zeroshot_top1" in summary:
            print(f"zero-shot top-1 accuracy on {summary['zeroshot_samples']} held-out samples: "
                  f"{100 * summary['zeroshot_top1']:.1f}%")
        if "retrieval_i2t_r1" in summary:
            from mmpretrain.eval.offline import retrieval_line

            print(retrieval_line(summary))
    return 0


def _explain_oom(cfg: object, error: BaseException) -> None:
    """Say that the device ran out of memory and what would make the run fit."""
    import torch

    from mmpretrain.engine.dist import detect_env
    from mmpretrain.engine.ds_config import resolve_precision
    from mmpretrain.engine.memory import oom_advice

    denv = detect_env()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    total = torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else None
    print(f"mmpretrain train: error: rank {denv.rank} ran out of device memory: "
          f"{str(error).splitlines()[0]}", file=sys.stderr)
    if denv.local_rank != 0:  # one plan per node is enough (ranks run out together)
        return
    try:
        advice = oom_advice(cfg, denv.world_size, resolve_precision(cfg.engine.precision, device),
                            total)
    except Exception as e:  # the error above stands without the advice
        advice = f"(no memory plan: {type(e).__name__}: {e})"
    print(advice, file=sys.stderr, flush=True)


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


def cmd_caption(args: argparse.Namespace) -> int:
    """Caption image files with a trained fusion (CoCa) model."""
    from mmpretrain.checkpoint.export import ExportError
    from mmpretrain.eval.caption_cli import CaptionOptions, caption_files

    opts = CaptionOptions(args.beam, args.max_len, args.length_penalty, args.batch_size,
                          args.device)
    try:
        results = caption_files(args.checkpoint, args.images, opts)
    except (ExportError, FileNotFoundError, ValueError) as e:
        print(f"mmpretrain caption: error: {e}", file=sys.stderr)
        return 2
    for r in results:
        print(json.dumps(r) if args.json else f"{r['image']}\t{r['caption']}")
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


def cmd_plot(args: argparse.Namespace) -> int:
    """Write one PNG of the curves in the runs' metrics.jsonl."""
    from mmpretrain.logging.plot import describe, plot_runs

    try:
        out = plot_runs(args.runs, args.out or None, args.dpi)
    except (FileNotFoundError, ValueError) as e:
        print(f"mmpretrain plot: error: {e}", file=sys.stderr)
        return 2
    size = describe(out)
    print(f"wrote {out} ({size['width']}x{size['height']} px)")
    return 0


def _add_plot_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="PNG of loss, lr, samples/s, MFU, data wait, eval curves")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories to overlay")
    p.add_argument("--out", "-o", default="", metavar="PNG",
                   help="output file (default: <first RUN_DIR>/metrics.png)")
    p.add_argument("--dpi", type=int, default=100, help="pixels per inch (figure: 15x8 in)")
    p.set_defaults(func=cmd_plot)


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


def cmd_eval(args: argparse.Namespace) -> int:
    """Zero-shot and retrieval evaluation of a saved model (run, checkpoint or export dir)."""
    from mmpretrain.checkpoint.export import ExportError
    from mmpretrain.eval import EvalSetupError
    from mmpretrain.eval.offline import (EvalOptions, append_record, evaluate_checkpoint,
                                         format_summary)

    opts = EvalOptions(args.data, args.zeroshot, args.zeroshot_data, args.batch_size,
                       args.workers, args.device)
    try:
        record = evaluate_checkpoint(args.checkpoint, opts, args.trust_checkpoint)
    except (FileNotFoundError, ExportError, EvalSetupError) as e:
        print(f"mmpretrain eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(record) if args.json else format_summary(record))
    if args.metrics:
        append_record(args.metrics, record)
    return 0


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="zero-shot + retrieval metrics of a saved model")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="run directory (newest checkpoint), step_* directory or export directory")
    p.add_argument("--data", default="", metavar="SHARDS",
                   help="held-out shards for retrieval (default: the run's data.val_shards, or "
                        "the demo's held-out digits)")
    p.add_argument("--zeroshot", default="", metavar="FILE_OR_digits",
                   help="classes file (JSON/YAML: classnames, templates), digits or none "
                        "(default: the run's eval.zeroshot)")
    p.add_argument("--zeroshot-data", default="", metavar="SHARDS",
                   help="labelled shards for a classes file (default: the held-out shards)")
    p.add_argument("--batch-size", type=int, default=0, help="default: the run's")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--metrics", default="", metavar="FILE",
                   help="append the result as one JSON line to FILE")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling of the DeepSpeed files (trusted sources only)")
    p.set_defaults(func=cmd_eval)


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
    p = sub.add_parser("caption", help="caption images with a trained fusion (CoCa) model")
    p.add_argument("--checkpoint", required=True,
                   help="run directory (latest checkpoint), checkpoint directory or export")
    p.add_argument("images", nargs="+", help="image files (any format PIL reads)")
    p.add_argument("--beam", type=int, default=1, help="beam width (1: greedy)")
    p.add_argument("--max-len", type=int, default=0,
                   help="token positions incl. start/end (0: the model's context length)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search ranks score / length**penalty")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_caption)
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
    _add_eval_parser(sub)
    add_bench_parser(sub)
    _add_plot_parser(sub)
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


STDOUT_IS_DATA = ("caption", "eval", "export")
"""Commands whose standard output is their result (JSON, captions): DeepSpeed's log lines,
which it writes to stdout, go to stderr instead."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mmpretrain` console script."""
    from mmpretrain.config.load import ConfigError
    from mmpretrain.engine.errors import NonFiniteTrainingError

    argv = _drop_local_rank(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command is None:  # `mmpretrain` alone: the demo
        args = build_parser().parse_args(["train", *(argv or [])])
    if args.command in STDOUT_IS_DATA:
        from mmpretrain.engine.ds_config import deepspeed_logs_to_stderr
        deepspeed_logs_to_stderr()
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
