"""`mmpretrain bench ...`: the data, attention-kernel, loss, training and memory benchmarks'
command lines."""
from __future__ import annotations

import argparse
import json
import sys


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
    """Time the Triton attention kernel against SDPA backends and FlexAttention, or (--sweep)
    sweep its tile sizes (CUDA only)."""
    import torch

    from mmpretrain.kernels import bench, sweep

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    warmup = args.warmup if args.warmup is not None else (5 if args.sweep else 10)
    iters = args.iters if args.iters is not None else (20 if args.sweep else 50)
    shapes = args.shapes.split(",")
    if args.aot:
        return _bench_attention_aot(args, shapes, dtype)
    try:
        if args.tiles and not args.sweep:
            from mmpretrain.kernels.tiles import load_tile_table
            load_tile_table(args.tiles)  # the `triton` column launches the measured tiles
        entries = _precompile(args, shapes, dtype)
        if args.sweep:
            records = sweep.sweep_tiles(  # progress on stderr, and the JSON kept current:
                shapes, dtype, warmup=warmup, iters=iters,  # partial results if killed
                progress=_sweep_progress(args.json))
        else:
            records = bench.bench_attention(  # each row on stderr too, as it is measured
                shapes, args.impls.split(","), dtype, warmup, iters,
                progress=lambda r: print(bench.format_table([r]).splitlines()[-1],
                                         file=sys.stderr, flush=True))
    except (RuntimeError, ValueError) as e:
        print(f"mmpretrain bench attention: error: {e}", file=sys.stderr)
        return 2
    if entries is not None:  # the same directory: FlexAttention's Inductor run may repoint
        from mmpretrain.kernels.precompile import cache_entries  # Triton's cache elsewhere
        print(f"Triton kernels the JIT compiled while timing: "
              f"{cache_entries(entries[0]) - entries[1]}",
              file=sys.stderr)  # 0 when the precompile's cache keys matched
    print(sweep.format_best(records) if args.sweep else bench.format_table(records))
    if args.json:
        bench.write_json(records, args.json)
    return 0


def _sweep_progress(json_path: str):  # noqa: ANN202
    """Per sweep record: a line on stderr, and (with --json) the file rewritten with every
    record so far and its best-of marks, so a sweep cut short still leaves a usable table."""
    from mmpretrain.kernels import bench, sweep

    done: list[dict] = []

    def progress(rec: dict) -> None:
        print(sweep.progress_line(rec), file=sys.stderr, flush=True)
        if json_path:
            done.append(dict(rec))
            bench.write_json(sweep.mark_best(done), json_path)
    return progress


def _precompile(args: argparse.Namespace, shapes: list[str],
                dtype: object) -> tuple[str, int] | None:
    """With CUDA and --precompile-workers != 0: compile the kernels about to be timed in
    parallel (`kernels/precompile.py`), report on stderr; returns Triton's cache directory
    and its entry count after it (None when skipped)."""
    import torch

    from mmpretrain.kernels import bench, precompile
    from mmpretrain.kernels.attention_triton import device_arch, device_sms

    workers = args.precompile_workers
    if workers == 0 or not torch.cuda.is_available():
        return None
    unknown = [s for s in shapes if s not in bench.SHAPES]
    if unknown:
        raise ValueError(f"unknown shapes {unknown}; shapes: {list(bench.SHAPES)}")
    dev = torch.device("cuda")
    arch, sms = device_arch(dev), device_sms(dev)
    jobs = (precompile.sweep_jobs(shapes, dtype, arch, sms) if args.sweep else
            precompile.bench_jobs(shapes, args.impls.split(","), dtype, arch, sms))
    report = precompile.precompile(jobs, workers if workers > 0 else
                                   precompile.default_workers())
    print(f"precompile: {json.dumps(report)}", file=sys.stderr, flush=True)
    path = precompile.cache_dir()
    return path, precompile.cache_entries(path)


def _bench_attention_aot(args: argparse.Namespace, shapes: list[str], dtype: object) -> int:
    """`bench attention --aot`: compile the kernels' launches for a GPU target, no GPU needed."""
    from mmpretrain.kernels import aot

    try:
        records = aot.aot_table(shapes, args.arch, dtype, sweep=args.sweep)
    except (RuntimeError, ValueError) as e:
        print(f"mmpretrain bench attention --aot: error: {e}", file=sys.stderr)
        return 2
    print(aot.format_table(records))
    if args.json:
        aot.write_json(records, args.json, args.arch)
    return 0


def _add_bench_attention_parser(bsub: argparse._SubParsersAction) -> None:
    from mmpretrain.kernels.bench import IMPLS, SHAPES

    b = bsub.add_parser("attention", help="fused Triton attention vs SDPA/Flex (ms, TFLOP/s)")
    b.add_argument("--shapes", default=",".join(SHAPES), help=f"subset of {list(SHAPES)}")
    b.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {list(IMPLS)}")
    b.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    b.add_argument("--warmup", type=int, default=None, help="untimed runs (default 10; sweep 5)")
    b.add_argument("--iters", type=int, default=None,
                   help="timed runs; the median is reported (default 50; sweep 20)")
    b.add_argument("--sweep", action="store_true",
                   help="instead of the comparison: sweep the Triton kernel's tile sizes per "
                   "shape (fwd, then fwd+bwd with the best fwd fixed, split and fused backward "
                   "plans); prints the best configs")
    b.add_argument("--aot", action="store_true",
                   help="no GPU needed: compile the launches (the heuristic tiles, or with "
                   "--sweep every candidate) for --arch and print registers, spills, shared "
                   "memory and wgmma use per kernel")
    b.add_argument("--arch", type=int, default=90, help="--aot target: 90 Hopper, 80 Ampere")
    b.add_argument("--precompile-workers", type=int, default=-1,
                   help="compile the Triton kernels to be timed first, in this many processes "
                   "(-1: the CPUs, at most 16; 0: off, the JIT compiles on first launch)")
    b.add_argument("--json", default="", help="also write the records to this JSON file")
    b.add_argument("--tiles", default="",
                   help="a --sweep --json file: the `triton` column uses the tiles and "
                   "backward plan measured fastest there (as model.attention_tiles does)")
    b.set_defaults(func=cmd_bench_attention)


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
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
    _add_bench_train_parser(bsub)
    _add_bench_host_ab_parser(bsub)
    _add_bench_memory_parser(bsub)
    _add_bench_loss_parser(bsub)


def cmd_bench_train(args: argparse.Namespace) -> int:
    """Time training steps of the real Trainer (samples/s, TFLOP/s, MFU), optionally vs OpenCLIP."""
    from mmpretrain.engine.bench import BenchOptions, bench_report
    from mmpretrain.engine.bench_format import format_report, print_notes

    opts = BenchOptions(args.model, args.batch, args.data, args.zero, args.steps, args.warmup,
                        args.workers, args.precision, args.overrides, args.sync_each_step,
                        args.gpu_memory, args.profile, args.host_twin)
    try:
        report = bench_report(opts, args.compare or "", progress=lambda ours: print(
            f"mmpretrain: {ours['samples_per_s']:.1f} samples/s, mfu {ours['mfu']}, peak "
            f"{ours['peak_mem_gb']} GB (JSON: {json.dumps(ours)})", file=sys.stderr, flush=True))
    except ValueError as e:
        print(f"mmpretrain bench train: error: {e}", file=sys.stderr)
        return 2
    if report is None:  # not rank 0
        return 0
    print_notes(report)
    print(json.dumps(report) if args.json else format_report(report))
    return 3 if report["mmpretrain"].get("oom") else 0


def _add_bench_train_parser(bsub: argparse._SubParsersAction) -> None:
    b = bsub.add_parser("train", help="training samples/s, model TFLOP/s and MFU of the real "
                        "Trainer (optionally next to OpenCLIP)")
    b.add_argument("--model", default="vit_b16", help="named model size (model.size)")
    b.add_argument("--batch", type=int, default=256, help="micro-batch size per rank")
    b.add_argument("--data", default="synthetic", metavar="synthetic|SHARDS",
                   help="random batches kept on the device, or a shard pattern (resampled)")
    b.add_argument("--zero", type=int, default=1, choices=(0, 1, 2, 3), help="ZeRO stage")
    b.add_argument("--steps", type=int, default=30, help="timed steps")
    b.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    b.add_argument("--workers", type=int, default=8, help="DataLoader workers (shards only)")
    b.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    b.add_argument("--compare", default=None, choices=("open_clip",),
                   help="also time OpenCLIP's step (needs the [bench] extra)")
    b.add_argument("--json", action="store_true", help="print the report as one JSON line")
    b.add_argument("--sync-each-step", action="store_true",
                   help="wait for the device before each step (the cost of a per-step host sync)")
    b.add_argument("--gpu-memory", type=float, default=0.0, metavar="GIB",
                   help="let the CUDA allocator use only what a device of GIB GiB would leave "
                   "it (79.1 for an H100 80GB); running out is reported, exit status 3")
    b.add_argument("--profile", default="", metavar="DIR",
                   help="profile 3 more steps (each side): print where the time goes and "
                   "write Chrome traces to DIR")
    b.add_argument("--host-twin", action="store_true",
                   help="the model with every width 32 and every parameter tensor kept: the "
                   "step time is the host's work per step, measurable on a CPU "
                   "(engine/host_twin.py)")
    b.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="more config overrides, e.g. model.activation_checkpointing=true")
    b.set_defaults(func=cmd_bench_train)


def cmd_bench_host_ab(args: argparse.Namespace) -> int:
    """Host work per step of config variants (and OpenCLIP), interleaved round by round."""
    from mmpretrain.engine.host_ab import HostAbOptions, format_host_ab, host_ab

    variants = [v.split() for v in args.variant] or [["engine.compile=true"]]
    opts = HostAbOptions(args.model, variants, args.compare == "open_clip", args.zero,
                         args.precision, args.rounds, args.steps, args.warmup)
    try:
        report = host_ab(opts)
    except ValueError as e:
        print(f"mmpretrain bench host-ab: error: {e}", file=sys.stderr)
        return 2
    if report["rank"] == 0:  # every rank timed the same rounds; one prints
        print(json.dumps(report) if args.json else format_host_ab(report))
    return 0


def _add_bench_host_ab_parser(bsub: argparse._SubParsersAction) -> None:
    b = bsub.add_parser("host-ab", help="the host's work per step of config variants (and "
                        "OpenCLIP) on the host twin, timed in interleaved rounds")
    b.add_argument("--model", default="vit_b16", help="named model size (model.size)")
    b.add_argument("--variant", action="append", default=[], metavar="'key=value ...'",
                   help="config overrides of one variant (repeat; the first is the baseline; "
                   "default: engine.compile=true)")
    b.add_argument("--compare", default=None, choices=("open_clip",),
                   help="also time OpenCLIP's twin (needs the [bench] extra)")
    b.add_argument("--zero", type=int, default=1, choices=(0, 1, 2), help="ZeRO stage")
    b.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    b.add_argument("--rounds", type=int, default=10, help="timed rounds")
    b.add_argument("--steps", type=int, default=10, help="steps of each participant per round")
    b.add_argument("--warmup", type=int, default=5, help="untimed steps of each first")
    b.add_argument("--json", action="store_true", help="print the report as one JSON line")
    b.set_defaults(func=cmd_bench_host_ab)


def cmd_bench_memory(args: argparse.Namespace) -> int:
    """Predict a run's device and host memory per rank (no GPU needed)."""
    from mmpretrain.config.load import ConfigError
    from mmpretrain.engine.memory import H100_80GB_GIB, format_plan, plan_memory

    try:
        cfg = _memory_config(args)
        precision = args.precision or (cfg.engine.precision if cfg.engine.precision != "auto"
                                       else "bf16")  # auto: bf16 on the GPU
        plan = plan_memory(cfg, args.world, precision)
    except (ConfigError, ValueError, OSError) as e:
        print(f"mmpretrain bench memory: error: {e}", file=sys.stderr)
        return 2
    gpu = args.gpu_memory or H100_80GB_GIB
    what = {"model": cfg.model.size or "custom", "batch": cfg.data.batch_size,
            "zero": cfg.engine.zero_stage, "world": args.world, "precision": precision,
            "config": args.config or None, "overrides": args.overrides}
    if args.json:
        print(json.dumps({**what, "params": plan.params, "device": plan.device,
                          "host": plan.host, "device_total": plan.device_total,
                          "host_total": plan.host_total,
                          "activation_bytes_per_sample": plan.activation_bytes_per_sample,
                          "gpu_memory_gib": gpu, "max_batch": plan.max_batch(int(gpu * 2**30))}))
    else:
        print(f"mmpretrain bench memory: {what['model']}"
              + (f" ({args.config})" if args.config else "")
              + f", ZeRO {what['zero']}, {args.world} rank(s), {precision}"
              + "".join(f", {o}" for o in args.overrides))
        print(format_plan(plan, gpu, args.host_memory))
    return 0


def _memory_config(args: argparse.Namespace):  # noqa: ANN202 - an ExperimentConfig
    """The run to plan: `--config` (with --model/--batch/--zero only where given), or a named
    size as `bench train` builds it (defaults vit_b16, batch 256, ZeRO 1)."""
    from mmpretrain.config.load import load_config
    from mmpretrain.engine.bench import BenchOptions, bench_overrides

    if args.config:
        given = [f"model.size={args.model}"] if args.model else []
        given += [f"data.batch_size={args.batch}"] if args.batch else []
        given += [f"engine.zero_stage={args.zero}"] if args.zero is not None else []
        return load_config(args.config, [*given, *args.overrides])
    opts = BenchOptions(model=args.model or "vit_b16", batch=args.batch or 256,
                        zero=1 if args.zero is None else args.zero, overrides=args.overrides)
    return load_config(None, bench_overrides(opts, "bench-memory"))


def _add_bench_memory_parser(bsub: argparse._SubParsersAction) -> None:
    b = bsub.add_parser("memory", help="predict device and host memory per rank of a training "
                        "run (model states by ZeRO stage and offload, activations measured on "
                        "CPU); no GPU needed")
    b.add_argument("--config", "-c", default="",
                   help="plan this run config (YAML; --model/--batch/--zero override it)")
    b.add_argument("--model", default=None,
                   help="named model size (model.size; default vit_b16 without --config)")
    b.add_argument("--batch", type=int, default=None,
                   help="micro-batch size per rank (default 256 without --config)")
    b.add_argument("--zero", type=int, default=None, choices=(0, 1, 2, 3),
                   help="ZeRO stage (default 1 without --config)")
    b.add_argument("--world", type=int, default=1, help="ranks the run would use")
    b.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                   help="default: the config's, bf16 for auto")
    b.add_argument("--gpu-memory", type=float, default=None,
                   help="device memory to check against, GiB (default: an H100 80GB's 79.1)")
    b.add_argument("--host-memory", type=float, default=None,
                   help="host memory per rank to check against, GiB")
    b.add_argument("--json", action="store_true", help="print the plan as one JSON line")
    b.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, e.g. engine.offload_optimizer=true")
    b.set_defaults(func=cmd_bench_memory)


def cmd_bench_loss(args: argparse.Namespace) -> int:
    """Time the contrastive loss alone, plain vs fused, and the memory it keeps."""
    import torch

    from mmpretrain.losses.bench import bench_loss, format_table

    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        records = bench_loss(args.kinds.split(","), args.impls.split(","),
                             [int(n) for n in args.batches.split(",")], args.width, device,
                             args.warmup, args.iters,
                             progress=lambda r: print(format_table([r]).splitlines()[-1],
                                                      file=sys.stderr, flush=True),
                             tf32=args.tf32)
    except ValueError as e:
        print(f"mmpretrain bench loss: error: {e}", file=sys.stderr)
        return 2
    print(f"mmpretrain bench loss: {device}, torch {torch.__version__}, embedding width "
          f"{args.width}, fp32 features" + (", TF32 matmuls" if args.tf32 else ""))
    print(format_table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


def _add_bench_loss_parser(bsub: argparse._SubParsersAction) -> None:
    b = bsub.add_parser("loss", help="the contrastive loss alone over a global batch: plain vs "
                        "fused (loss.fused), forward+backward ms and the memory it keeps")
    b.add_argument("--kinds", default="clip,siglip", help="clip (the full (N, N) matrix, as "
                   "every rank computes it without local_loss) and/or siglip")
    b.add_argument("--impls", default="plain,fused")
    b.add_argument("--batches", default="256,4096,16384", help="global batch sizes N")
    b.add_argument("--width", type=int, default=512, help="embedding width E")
    b.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--iters", type=int, default=10)
    b.add_argument("--tf32", action="store_true",
                   help="let CUDA's fp32 matmuls use TF32 tensor cores (engine.tf32)")
    b.add_argument("--json", default="", metavar="FILE", help="also write the records here")
    b.set_defaults(func=cmd_bench_loss)
