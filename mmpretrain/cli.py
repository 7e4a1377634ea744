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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mmpretrain` console script."""
    from mmpretrain.config.load import ConfigError

    args = build_parser().parse_args(argv)
    if args.command is None:  # `mmpretrain` alone: the demo
        args = build_parser().parse_args(["train", *(argv or [])])
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"mmpretrain: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
