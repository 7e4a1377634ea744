"""`mmpretrain bench train`: training throughput and MFU of the real Trainer on this machine,
optionally next to OpenCLIP's training step on the same architecture and batch.

Ours: an `ExperimentConfig` for the named size (checkpoints, evaluation and wandb off) runs the
real `Trainer` (DeepSpeed engine, task, loss, optimizer) for `warmup` steps, then `steps` timed
steps; CUDA is synchronized before each clock read and nothing else syncs inside the timed
steps beyond what the trainer itself does. With synthetic data a pool of 4 batches is generated
once and kept on the device, so the step alone is timed (as for OpenCLIP below); with shards
the real data stream feeds the steps and its wait shows in `data_wait_frac`.

OpenCLIP (`--compare open_clip`): `open_clip.create_model(name)` trained like its
`--torchcompile --precision amp_bf16` run: `torch.compile(model)`, bf16 autocast, AdamW
(fused on CUDA) with OpenCLIP's no-decay groups, `ClipLoss`, the logit-scale clamp after each
step, on random images and tokens kept on the device. On CPU it runs eager in fp32, except
for the host twin (`--host-twin`, `engine/host_twin.py`), which both sides run as on a GPU.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import math
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from mmpretrain.config.load import load_config
from mmpretrain.engine.dist import detect_env
from mmpretrain.engine.host_twin import register_open_clip_twin, twin_overrides
from mmpretrain.engine.timeline import phase
from mmpretrain.logging.flops import (device_name, flops_metrics, peak_tflops,
                                      train_flops_per_sample)
from mmpretrain.logging.metrics import peak_memory_gb

OPEN_CLIP_MODELS = {"vit_b32": "ViT-B-32", "vit_b16": "ViT-B-16", "vit_l14": "ViT-L-14"}
"""Our named sizes with an architecture-identical OpenCLIP model."""
SKIP_MESSAGE = ("open-clip-torch is not installed; pip install 'mmpretrain[bench]' (or "
                "open-clip-torch==3.3.0) to compare with OpenCLIP; skipping the comparison")
POOL_BATCHES = 4
PROFILE_STEPS = 3
TWIN_CHUNKS = 5


@dataclass
class BenchOptions:
    """What `mmpretrain bench train` runs (its command-line options)."""

    model: str = "vit_b16"
    batch: int = 256
    data: str = "synthetic"
    zero: int = 1
    steps: int = 30
    warmup: int = 10
    workers: int = 8
    precision: str = "auto"
    overrides: list[str] = field(default_factory=list)
    sync_each_step: bool = False
    """Wait for the device before each step: what a host sync per step (e.g. reading a loss or
    a flag with .item()) would cost; the trainer itself avoids one."""
    gpu_memory: float = 0.0
    """Limit the CUDA allocator to what a device of this many GiB would leave it (0: no
    limit): an H200 then answers whether a run fits an H100 80GB."""
    profile: str = ""
    """Profile PROFILE_STEPS more steps after the timed ones and write the traces to this
    directory (`engine/profile.py`); empty: no profiling."""
    host_twin: bool = False
    """Run the model's host twin instead (`engine/host_twin.py`): every width 32, every
    parameter tensor kept, one torch thread; the step time is then the host's work per step."""


def bench_overrides(opts: BenchOptions, output_dir: str) -> list[str]:
    """The config overrides of a benchmark run (the user's `overrides` last, so they win)."""
    if opts.steps < 1 or opts.warmup < 0 or opts.batch < 1:
        raise ValueError(f"--steps ({opts.steps}) and --batch ({opts.batch}) must be >= 1 and "
                         f"--warmup ({opts.warmup}) >= 0")
    if opts.data == "synthetic":
        data = ["data.source=synthetic"]
    else:  # resampled: endless, no minimum shard count, sample counts optional
        data = ["data.source=shards", f'data.train_shards="{_yaml_str(opts.data)}"',
                "data.mode=resampled", f"data.num_workers={opts.workers}"]
    steps = opts.warmup + opts.steps + (PROFILE_STEPS if opts.profile else 0)
    return [f"model.size={opts.model}", f"data.batch_size={opts.batch}", *data,
            f"engine.zero_stage={opts.zero}", f"engine.precision={opts.precision}",
            f"optim.steps={steps}", f"optim.warmup_steps={opts.warmup}",
            "checkpoint.every=0", "checkpoint.save_final=false", "checkpoint.resume=none",
            "eval.at_end=false", "eval.every=0", "logging.wandb_mode=disabled",
            "logging.progress=false", f'output_dir="{_yaml_str(output_dir)}"', "name=bench",
            *(twin_overrides(opts.model) if opts.host_twin else []), *opts.overrides]


def _yaml_str(text: str) -> str:
    """`text` escaped for a double-quoted YAML scalar (overrides are parsed as YAML)."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds of `fn()`, with the device (and the ranks) synchronized at both ends."""
    _sync(device)
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _timed_steps(opts: BenchOptions, device: torch.device, run: Callable[[int], Any]
                 ) -> tuple[float, int, float, Any]:
    """Time `opts.steps` steps of `run(n)`: (seconds for `opts.steps` steps, steps in the last
    call, that call's seconds, its output). One call in general; the host twin makes
    TWIN_CHUNKS calls and scales the median one, since a shared machine disturbs host work in
    bursts that a median ignores."""
    chunks = TWIN_CHUNKS if opts.host_twin and opts.steps >= TWIN_CHUNKS else 1
    n = opts.steps // chunks
    rates, out, last = [], None, 0.0
    for _ in range(chunks):
        last, out = _timed(device, lambda: run(n))
        rates.append(last / n)
    return statistics.median(rates) * opts.steps, n, last, out


def _device_pool(trainer: Any) -> Any:
    """An endless iterator over POOL_BATCHES synthetic batches kept on the training device."""
    pool = []
    for i in range(POOL_BATCHES):
        b = trainer.stream.batch(i)
        pool.append({**b, "image": b["image"].to(trainer.device),  # (B, 3, S, S) uint8
                     "tokens": b["tokens"].to(trainer.device)})  # (B, L)
    return itertools.cycle(pool)


def versions() -> dict[str, str]:
    """Versions of what the timing depends on."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import deepspeed
        out["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    if torch.version.cuda and torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def _speed(opts: BenchOptions, elapsed: float, global_batch: int, train_flops: int,
           world: int, device: torch.device) -> dict[str, Any]:
    """samples/s, step time, TFLOP/s per rank and MFU of `opts.steps` steps in `elapsed` s."""
    samples_per_s = opts.steps * global_batch / elapsed
    peak = peak_tflops(device)
    speed = flops_metrics(samples_per_s, train_flops, world, peak)
    return {"samples_per_s": samples_per_s, "step_time_s": elapsed / opts.steps,
            "tflops_per_s": speed["tflops_per_s"], "mfu": speed.get("mfu"),
            "peak_tflops": peak, "train_flops_per_sample": train_flops}


def _measure(trainer: Any, opts: BenchOptions) -> dict[str, Any]:
    """Warm up, time `opts.steps` steps of `trainer`, and describe the result."""
    cfg = trainer.cfg
    batches = _device_pool(trainer) if cfg.data.source == "synthetic" else iter(trainer.stream)
    if opts.sync_each_step:
        batches = _syncing(batches, trainer.device)
    trainer.run_steps(opts.warmup, batches)
    elapsed, n, last, (meter, losses) = _timed_steps(
        opts, trainer.device, lambda n: trainer.run_steps(n, batches))
    params = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.task.model.parameters())
    profiled = _profile(opts, "mmpretrain", lambda n: trainer.run_steps(n, batches),
                        trainer.device)
    return {**profiled,
        "impl": "mmpretrain", "model": opts.model, "batch_per_rank": cfg.data.batch_size,
        "world_size": trainer.world, "global_batch": trainer.global_batch, "data": opts.data,
        "zero_stage": cfg.engine.zero_stage, "precision": trainer.precision,
        "steps": opts.steps, "warmup": opts.warmup, "overrides": list(opts.overrides),
        "sync_each_step": opts.sync_each_step,
        **_speed(opts, elapsed, trainer.global_batch, trainer.train_flops, trainer.world,
                 trainer.device),
        **_memory(trainer.device), **_plan(trainer),
        "data_wait_frac": meter.data_time / last, "params": params,
        "loss": float(losses["loss"]) / n,
        "device": device_name(trainer.device), "device_type": trainer.device.type,
        "versions": versions()}


def _profile(opts: BenchOptions, label: str, run: Callable[[int], Any],
             device: torch.device) -> dict[str, Any]:
    """{"profile": summary} of PROFILE_STEPS steps of `run` with `--profile`, else {}."""
    if not opts.profile:
        return {}
    from mmpretrain.engine.profile import profile_steps

    return {"profile": profile_steps(label, run, PROFILE_STEPS, device, opts.profile)}


def _memory(device: torch.device) -> dict[str, Any]:
    """Peak allocated (the figure the plan predicts) and reserved device memory, peak host RSS."""
    from mmpretrain.engine.memory import host_peak_gib

    cuda = device.type == "cuda"
    return {"peak_mem_gb": peak_memory_gb(device),
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None,
            "host_peak_gb": host_peak_gib()}


def _plan(trainer: Any) -> dict[str, Any]:
    """What `plan_memory` predicted for this run, next to the measured peaks."""
    from mmpretrain.engine.memory import plan_memory

    if trainer.rank != 0:
        return {}
    try:
        plan = plan_memory(trainer.cfg, trainer.world, trainer.precision)
    except Exception as e:  # the measurement stands without its prediction
        print(f"mmpretrain bench train: no memory prediction ({type(e).__name__}: {e})",
              file=sys.stderr)
        return {"predicted_peak_gb": None, "predicted_host_gb": None}
    return {"predicted_peak_gb": plan.device_total / 2**30,
            "predicted_host_gb": plan.host_total / 2**30}


def _precompile_attention(cfg: Any, local_rank: int) -> dict[str, Any] | None:
    """With the Triton attention on CUDA (forced, or where `model.attention_speeds` may take
    it), compile its kernels for both towers' shapes in parallel processes before the run (as
    `bench attention` does), so that the warm-up steps do not compile them one after another.
    One process per node does it."""
    triton = cfg.model.attention == "triton" or bool(cfg.model.attention_speeds)
    if not triton or not torch.cuda.is_available() or local_rank != 0:
        return None
    from mmpretrain.engine.ds_config import precision_dtype, resolve_precision
    from mmpretrain.kernels.attention_triton import device_arch, device_sms
    from mmpretrain.kernels.precompile import default_workers, model_jobs, precompile

    device = torch.device("cuda", torch.cuda.current_device())
    dtype = precision_dtype(resolve_precision(cfg.engine.precision, device))
    jobs = model_jobs(cfg.model, cfg.data.batch_size, dtype, device_arch(device),
                      device_sms(device))
    report = precompile(jobs, default_workers())
    print(f"mmpretrain bench train: precompiled the Triton attention: {report}",
          file=sys.stderr, flush=True)
    return report


def _oom_record(opts: BenchOptions, error: BaseException) -> dict[str, Any]:
    """The result of a run that ran out of device memory (the benchmark's answer: no fit)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return {"impl": "mmpretrain", "model": opts.model, "batch_per_rank": opts.batch,
            "zero_stage": opts.zero, "overrides": list(opts.overrides), "oom": True,
            "error": str(error).splitlines()[0][:300], "gpu_memory_limit_gb": opts.gpu_memory or None,
            **_memory(device), "device": device_name(device), "device_type": device.type,
            "versions": versions()}


def _syncing(batches: Iterator[dict], device: torch.device) -> Iterator[dict]:
    """`batches`, waiting for the device before handing out each one (`--sync-each-step`)."""
    for batch in batches:
        _sync(device)
        yield batch


def bench_mmpretrain(opts: BenchOptions) -> dict[str, Any] | None:
    """Run the real Trainer as `opts` says; the result on rank 0, None on other ranks."""
    from mmpretrain.engine.trainer import Trainer

    denv = detect_env()
    if denv.world_size == 1:
        tmp = tempfile.mkdtemp(prefix="mmpretrain-bench-")
    else:  # one name on every rank of the job (rank 0 fits a tokenizer the others load)
        tmp = str(Path(tempfile.gettempdir()) / f"mmpretrain-bench-{denv.master_port}")
    trainer = None
    try:
        if opts.gpu_memory:
            from mmpretrain.engine.memory import cap_device_memory
            index = denv.local_rank % max(1, torch.cuda.device_count())
            cap_device_memory(opts.gpu_memory, torch.device("cuda", index))
        cfg = load_config(None, bench_overrides(opts, tmp))
        compiled = _precompile_attention(cfg, denv.local_rank)
        trainer = Trainer(cfg)
        result = {**_measure(trainer, opts), "gpu_memory_limit_gb": opts.gpu_memory or None,
                  "precompile": compiled}
        if dist.is_initialized():
            dist.barrier()
    except torch.OutOfMemoryError as e:
        if denv.world_size > 1:
            raise  # the other ranks would wait in a collective
        result = _oom_record(opts, e)
    finally:
        if denv.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    del trainer
    gc.collect()
    return result if denv.rank == 0 else None


def open_clip_name(size: str) -> str:
    """OpenCLIP's name of our size `size`; ValueError (naming --model) if it has none."""
    if size not in OPEN_CLIP_MODELS:
        raise ValueError(f"--model {size!r} has no OpenCLIP equivalent for --compare open_clip "
                         f"(one of: {', '.join(OPEN_CLIP_MODELS)})")
    return OPEN_CLIP_MODELS[size]


def open_clip_problem() -> str | None:
    """None when `import open_clip` works, else why the comparison is skipped."""
    try:
        import open_clip  # noqa: F401
    except ImportError:
        return SKIP_MESSAGE
    except Exception as e:  # e.g. a torchvision built for another torch
        return f"open_clip failed to import ({type(e).__name__}: {e}); skipping the comparison"
    return None


def _open_clip_optimizer(model: torch.nn.Module, fused: bool) -> torch.optim.Optimizer:
    """AdamW with OpenCLIP's defaults for ViTs and its no-weight-decay parameter groups."""
    def exclude(n: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2}]
    return torch.optim.AdamW(groups, lr=5e-4, betas=(0.9, 0.98), eps=1e-6, fused=fused)


@dataclass
class OpenClipStep:
    """OpenCLIP's model for our size and its training step as `run(n)` (n steps)."""

    name: str
    model: torch.nn.Module
    run: Callable[[int], None]
    compiled: bool


def open_clip_step(opts: BenchOptions, device: torch.device) -> OpenClipStep:
    """OpenCLIP's model for `opts.model` (its host twin with `opts.host_twin`) and its training
    step as its `--torchcompile --precision amp_bf16` run takes it (see the module docstring),
    on random images and tokens kept on `device`."""
    import open_clip

    name = open_clip_name(opts.model)
    if opts.host_twin:
        name = register_open_clip_twin(open_clip, name)
    arch = open_clip.get_model_config(name)
    size, ctx = arch["vision_cfg"]["image_size"], arch["text_cfg"]["context_length"]
    vocab = arch["text_cfg"]["vocab_size"]
    torch.manual_seed(0)
    model = open_clip.create_model(name, device=device, output_dict=True)  # fp32 weights
    model.train()
    as_on_gpu = device.type == "cuda" or opts.host_twin  # eager fp32 on a CPU otherwise
    optimizer, loss_fn = _open_clip_optimizer(model, fused=as_on_gpu), open_clip.ClipLoss()
    step_model = torch.compile(model) if as_on_gpu else model
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if as_on_gpu else (
        contextlib.nullcontext)
    images = torch.randn(opts.batch, 3, size, size, device=device)  # (B, 3, S, S)
    tokens = torch.randint(0, vocab, (opts.batch, ctx), device=device)  # (B, L)

    def run(n: int) -> None:
        for _ in range(n):
            optimizer.zero_grad(set_to_none=True)
            with phase("forward"), autocast():
                loss = loss_fn(**step_model(images, tokens))
            with phase("backward"):
                loss.backward()
            with phase("optimizer"), torch.no_grad():
                optimizer.step()
                model.logit_scale.clamp_(0, math.log(100))

    return OpenClipStep(name, model, run, as_on_gpu)


def bench_open_clip(opts: BenchOptions, device: torch.device) -> dict[str, Any]:
    """Time OpenCLIP's training step for our size `opts.model` (see the module docstring)."""
    import open_clip

    gc.collect()
    base_mem = 0
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        base_mem = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    step = open_clip_step(opts, device)
    name, model, run, as_on_gpu = step.name, step.model, step.run, step.compiled
    run(opts.warmup)
    elapsed = _timed_steps(opts, device, run)[0]
    profiled = _profile(opts, "open_clip", run, device)
    ours = load_config(None, [f"model.size={opts.model}",  # the same architecture
                              *(twin_overrides(opts.model) if opts.host_twin else [])]).model
    peak_mem = ((torch.cuda.max_memory_allocated(device) - base_mem) / 2**30 if cuda
                else peak_memory_gb(device))
    return {"impl": "open_clip", "model": name, "batch_per_rank": opts.batch, "world_size": 1,
            "global_batch": opts.batch, "precision": "amp_bf16" if as_on_gpu else "fp32",
            "compiled": as_on_gpu, "steps": opts.steps, "warmup": opts.warmup,
            **_speed(opts, elapsed, opts.batch, train_flops_per_sample(ours), 1, device),
            "peak_mem_gb": peak_mem, "data_wait_frac": 0.0,
            "params": sum(p.numel() for p in model.parameters()),
            "device": device_name(device), "device_type": device.type, **profiled,
            "versions": {**versions(), "open_clip": open_clip.__version__}}


def bench_report(opts: BenchOptions, compare: str = "",
                 progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
    """Run ours (and OpenCLIP with `compare="open_clip"`): the report on rank 0, else None.

    `notes` lists what was skipped and why (OpenCLIP not installed, a multi-rank job).
    `progress` gets our result before OpenCLIP starts (a run cut short keeps it)."""
    notes: list[str] = []
    with_open_clip = compare == "open_clip"
    if compare not in ("", "open_clip"):
        raise ValueError(f"--compare {compare!r}: only 'open_clip' is supported")
    problem = open_clip_problem() if with_open_clip else None
    if problem:
        notes.append(problem)
        with_open_clip = False
    if with_open_clip:
        open_clip_name(opts.model)  # fail before the long run
    if opts.host_twin:  # intra-op threads are not host work a GPU run would have
        torch.set_num_threads(1)
    ours = bench_mmpretrain(opts)
    if ours is None:
        return None
    if ours.get("oom"):
        return {"options": asdict(opts), "mmpretrain": ours, "open_clip": None,
                "ratio_samples_per_s": None, "notes": notes}
    if progress is not None:
        progress(ours)
    theirs = None
    if with_open_clip and ours["world_size"] > 1:
        notes.append("the OpenCLIP comparison runs in a single process only; skipped")
    elif with_open_clip:
        theirs = bench_open_clip(opts, _device_of(ours))
    ratio = ours["samples_per_s"] / theirs["samples_per_s"] if theirs else None
    return {"options": asdict(opts), "mmpretrain": ours, "open_clip": theirs,
            "ratio_samples_per_s": ratio, "notes": notes}


def _device_of(result: dict[str, Any]) -> torch.device:
    if result["device_type"] == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
