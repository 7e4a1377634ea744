"""The Trainer: builds tokenizer, model, DeepSpeed engine, data stream and checkpoints from one
config, then runs a short training loop (`train`) around `train_step`."""
from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mmpretrain.checkpoint.manager import CheckpointManager
from mmpretrain.config.load import config_hash, to_dict, to_yaml
from mmpretrain.config.schema import ExperimentConfig
from mmpretrain.engine.copies import batch_copier
from mmpretrain.engine.dist import detect_env, init_distributed
from mmpretrain.engine.ds_config import (build_ds_config, resolve_precision,
                                         slow_path_warning)
from mmpretrain.engine.errors import NonFiniteTrainingError
from mmpretrain.engine.memory import loss_memory_warning
from mmpretrain.engine.optim import build_optimizer, build_scheduler, param_group_names
from mmpretrain.engine.stepflags import LaggedFlags, StepFlags
from mmpretrain.engine.steplog import LossWindow
from mmpretrain.engine.timeline import phase
from mmpretrain.logging.flops import flops_metrics, peak_tflops, train_flops_per_sample
from mmpretrain.logging.metrics import JsonlWriter, StepMeter, format_metrics, peak_memory_gb
from mmpretrain.model.task import FeatureCache, build_task

log = logging.getLogger("mmpretrain.trainer")
EVAL_PREFIXES = ("zeroshot_", "retrieval_", "caption_")  # evaluation metrics that get logged


def setup_logging(rank: int) -> None:
    """Console logging: INFO on rank 0, warnings only on other ranks."""
    root = logging.getLogger("mmpretrain")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(f"[%(asctime)s r{rank}] %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


class Trainer:
    """Trains one run described by an `ExperimentConfig` on every rank of the job."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        setup_logging(detect_env().rank)  # first, so init's "N rank(s) via LAUNCHER" line shows
        self.denv, self.device = init_distributed(cfg.engine.device, cfg.engine.backend)
        self.rank, self.world = self.denv.rank, self.denv.world_size
        self.run_dir = Path(cfg.output_dir) / cfg.name
        self.precision = resolve_precision(cfg.engine.precision, self.device)
        self.step = 0
        self.samples_seen = 0
        self._stop_signal: int | None = None
        self._grad_norm: torch.Tensor | None = None
        self.skipped_steps = 0
        self._skipped_in_a_row = 0
        self._stop_seen = False
        self._too_many_skipped: tuple[int, int] | None = None  # (step, run length) past limit
        self._last_eval: tuple[int, dict[str, Any]] = (-1, {})
        self._prepare_run_dir()
        self._build()

    # ---- construction --------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
        self._barrier()

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _build(self) -> None:
        import deepspeed

        from mmpretrain.engine.zero_epilogue import install_stream_ordered_epilogue
        from mmpretrain.engine.zero_norm import install_foreach_grad_norm
        from mmpretrain.engine.zero_one_rank import install_one_rank_reduce_skip
        from mmpretrain.engine.zero_repoint import install_repoint_check

        from mmpretrain import kernels
        from mmpretrain.data import build_train_stream, prepare_tokenizer

        cfg = self.cfg
        kernels.set_default_impl(cfg.model.attention)
        torch.backends.cuda.matmul.allow_tf32 = cfg.engine.tf32  # process-wide, set either way
        self.tokenizer = self._prepare_tokenizer(prepare_tokenizer)
        ds_cfg = build_ds_config(cfg, self.world, self.precision, self.device)
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint.keep_last,
                                      self.rank, self.world)
        self._resume_path = self.ckpt.resolve(cfg.checkpoint.resume)
        self._universal = None
        model = self._build_model(ds_cfg)
        self.task = build_task(cfg, model)
        if self._resume_path is not None and self.ckpt.needs_universal(
                self._resume_path, param_group_names(self.task)):
            self._universal = self.ckpt.universal(self._resume_path)
            ds_cfg["checkpoint"] = {"load_universal": True}
        optimizer = self._client_optimizer = build_optimizer(self.task, cfg.optim, self.device)
        # A factory: DeepSpeed calls it with the optimizer it wraps (ZeRO-3 regroups params).
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.task, optimizer=optimizer, config=ds_cfg,
            lr_scheduler=lambda opt: build_scheduler(opt, cfg.optim))
        install_foreach_grad_norm(self.optimizer)  # ZeRO-1/2: one norm kernel, not ~900
        install_repoint_check(self.optimizer)  # ZeRO-1/2: no per-step re-pointing of params
        install_one_rank_reduce_skip(self.optimizer)  # ZeRO-1, one rank: no identity reduction
        if not cfg.engine.epilogue_sync:  # ZeRO-1/2 overlap: no device sync after the backward
            install_stream_ordered_epilogue(self.optimizer)
        self.stream = build_train_stream(cfg, self.tokenizer, self.rank, self.world)
        self.jsonl = JsonlWriter(self.run_dir / "metrics.jsonl", enabled=self.rank == 0)
        self.global_batch = cfg.data.batch_size * cfg.engine.grad_accum * self.world
        for warning in (loss_memory_warning(cfg, self.world),
                        slow_path_warning(cfg, self.precision, self.device)):
            if warning and self.rank == 0:
                log.warning(warning)
        self.train_flops = train_flops_per_sample(cfg.model)  # model FLOPs of one sample
        self.peak_tflops = peak_tflops(self.device)  # None: unknown, no `mfu` logged
        self._flags = LaggedFlags(self.device, self.world)
        self._copy = batch_copier(self.device, cfg.engine.copy_stream)  # host -> device

    def _build_model(self, ds_cfg: dict) -> torch.nn.Module:
        """Build the model; under ZeRO-3 inside `zero.Init`, so no rank ever holds all weights
        (each parameter is gathered alone for its initialization, then re-partitioned)."""
        import deepspeed

        from mmpretrain.model import build_model
        from mmpretrain.model.layers import set_init_context

        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        if cfg.engine.zero_stage == 3:
            set_init_context(lambda p: deepspeed.zero.GatheredParameters([p], modifier_rank=0))
            try:
                with deepspeed.zero.Init(config_dict_or_path=ds_cfg):
                    model = build_model(cfg.model, cfg.loss.kind)
            finally:
                set_init_context(None)
        else:
            model = build_model(cfg.model, cfg.loss.kind)
        if cfg.engine.float8 != "off":
            from mmpretrain.engine.float8 import convert_float8

            convert_float8(model, cfg.engine.float8, self.device, cfg.data.batch_size,
                           compiled=cfg.engine.compile)
        if cfg.engine.compile:
            from mmpretrain.engine.compile import compile_model, compile_scope

            compile_model(model, cfg.engine.compile_mode, compile_scope(cfg, self.world))
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        log.info("model %s: %.2fM parameters, precision %s, ZeRO stage %d", cfg.model.size or
                 "custom", n_params / 1e6, self.precision, cfg.engine.zero_stage)
        return model

    def _prepare_tokenizer(self, prepare: Any) -> Any:
        """Rank 0 fits or loads the tokenizer first; the others then load what it saved."""
        tok = prepare(self.cfg, self.run_dir) if self.rank == 0 else None
        self._barrier()
        if self.rank != 0:
            tok = prepare(self.cfg, self.run_dir)
        vocab = self.cfg.model.text.vocab_size
        if tok is not None and tok.vocab_size > vocab:
            raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but "
                             f"model.text.vocab_size is {vocab}; raise model.text.vocab_size")
        return tok

    # ---- checkpoints ---------------------------------------------------------------------
    def resume(self) -> bool:
        """Load the checkpoint `checkpoint.resume` names (if any); True when one was loaded."""
        path = self._resume_path
        if path is None:
            return False
        client, meta = self.ckpt.load(self.engine, path, self._universal)
        if meta["world_size"] != self.world:
            log.warning("resuming %s saved by %d rank(s) on %d: weights and optimizer state "
                        "continue; the data stream continues at the same fraction of its epoch",
                        path, meta["world_size"], self.world)
        self.step, self.samples_seen = client["step"], client["samples_seen"]
        self.skipped_steps = client.get("skipped_steps", 0)
        self.stream.load_state_dict(client["data"])
        if meta.get("config_hash") != config_hash(self.cfg):
            log.warning("resuming %s saved with a different config (hash %s, now %s)",
                        path, meta.get("config_hash"), config_hash(self.cfg))
        self.jsonl.truncate_after(self.step)
        log.info("resumed from %s at step %d (%d samples seen)", path, self.step,
                 self.samples_seen)
        return True

    def save(self) -> Path:
        """Checkpoint the engine, the data stream position and the counters."""
        self._settle(self._flags.drain())  # exact skipped_steps in the checkpoint
        client = {"step": self.step, "samples_seen": self.samples_seen,
                  "skipped_steps": self.skipped_steps,
                  "data": self.stream.state_dict(), "config_hash": config_hash(self.cfg)}
        meta = {"config_hash": config_hash(self.cfg), "samples_seen": self.samples_seen,
                "zero_stage": self.cfg.engine.zero_stage, "precision": self.precision}
        return self.ckpt.save(self.engine, self.step, client, meta)

    # ---- the step ------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.task.caption_loss is not None:  # on the host: on the device it would wait
            self.task.caption_loss.check(batch["tokens"])
        images, tokens = self._copy([batch["image"], batch["tokens"]])
        return images, tokens

    def train_step(self, micro_batches: list[dict],
                   want_grad_norm: bool = False) -> dict[str, torch.Tensor]:
        """One optimizer step over `grad_accum` micro-batches; returns the losses (on device):
        `loss` (the weighted total), `contrastive_loss`, and `caption_loss` for CoCa models.

        With accumulation, features of all micro-batches are cached without grad, then each
        micro-batch is recomputed with grad against the cached negatives, so the loss and its
        gradient equal those of one big batch (the logit scale's gradient is taken once)."""
        eng = self.engine
        self._client_optimizer.skip_flag = None  # stays None if DeepSpeed skips the step (fp16)
        inputs = [self._to_device(b) for b in micro_batches]
        cache = None
        if len(inputs) > 1:
            cache = FeatureCache()
            with torch.no_grad():
                for images, tokens in inputs:
                    f = eng(images, tokens, features_only=True)
                    cache.image.append(f["image_features"])
                    cache.text.append(f["text_features"])
        caption = []
        for j, (images, tokens) in enumerate(inputs):
            with phase("forward"):
                out = eng(images, tokens, cache=cache, index=j)
            if "caption_loss" in out:
                caption.append(out["caption_loss"])
            # DeepSpeed divides every micro-batch's gradient by the accumulation steps (also
            # through output hooks, whatever scale_wrt_gas says). The cached-feature loss is
            # already the loss of the whole accumulated batch, so undo that division.
            with phase("backward"):
                eng.backward(out["loss"] * len(inputs) if cache is not None else out["loss"])
            if want_grad_norm and j == len(inputs) - 1:
                self._grad_norm = self._unpartitioned_grad_norm()
            with phase("optimizer"):
                eng.step()
        return self._step_losses(out, caption)

    def _step_losses(self, out: dict[str, torch.Tensor],
                     caption: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The step's losses: the contrastive loss covers the whole accumulated batch (the
        last micro-batch's value); the caption loss is the mean over micro-batches."""
        losses = {"contrastive_loss": out["contrastive_loss"]}
        total = self.task.contrastive_weight * out["contrastive_loss"]
        if caption:
            losses["caption_loss"] = torch.stack(caption).mean()
            total = total + self.task.caption_weight * losses["caption_loss"]
        return {"loss": total.detach(), **losses}

    def _unpartitioned_grad_norm(self) -> torch.Tensor | None:
        """Global grad norm (on the device) from p.grad where DeepSpeed does not report one
        (ZeRO-0 fp32: gradients are full and already averaged across ranks after the last
        backward)."""
        if self.cfg.engine.zero_stage != 0 or self.precision != "fp32":
            return None
        grads = [p.grad for p in self.task.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        return torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g.float()) for g in grads]))

    # ---- the loop ------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        def request_stop(signum: int, _frame: Any) -> None:
            self._stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, request_stop)

    def _settle(self, flags: list[StepFlags]) -> None:
        """Count skipped steps and note stop requests from steps the host has now read."""
        for f in flags:
            self._stop_seen = self._stop_seen or f.stop
            if not f.skipped:
                self._skipped_in_a_row = 0
                continue
            self.skipped_steps += 1
            self._skipped_in_a_row += 1
            log.warning("step %d skipped: non-finite loss or gradient (%d in a row)", f.step,
                        self._skipped_in_a_row)
            if (self._skipped_in_a_row > self.cfg.optim.max_skipped_steps
                    and self._too_many_skipped is None):
                self._too_many_skipped = (f.step, self._skipped_in_a_row)

    def _start_log(self) -> None:
        """Close the log window at this step: its device numbers are queued for the host (no
        wait) and `_finish_log` writes the line once this step has finished
        (`engine/steplog.py`); the host fields are read now."""
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = self._grad_norm if grad_norm is None else grad_norm
        speed = self._meter.summary()
        speed.update(flops_metrics(speed["samples_per_s"], self.train_flops, self.world,
                                   self.peak_tflops))  # tflops_per_s, mfu (known peak)
        stream = self.stream.metrics() if hasattr(self.stream, "metrics") else {}
        fields = {"lr": float(self.scheduler.get_last_lr()[0]), **speed,
                  "peak_mem_gb": peak_memory_gb(self.device), "samples_seen": self.samples_seen,
                  "stream": stream}
        self._window.close(self.step, grad_norm, fields)
        self._meter.reset()

    def _finish_log(self) -> None:
        """Write the pending log line (waits for its step only; skipped steps are counted up
        to that step, whose flags the host has read by now)."""
        got = self._window.take()
        if got is None:
            return
        losses, f = got.losses, dict(got.fields)
        stream = f.pop("stream")
        record = {"step": got.step, "total_steps": self.cfg.optim.steps,
                  "loss": losses.pop("loss"), **losses, "lr": f.pop("lr"),
                  "grad_norm": got.grad_norm, **f, "skipped_steps": self.skipped_steps,
                  **stream}
        if self.rank == 0:
            record.pop("total_steps")
            self.jsonl.write(record)
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=got.step)
            log.info(format_metrics({"total_steps": self.cfg.optim.steps, **record}))

    def _finish_log_after_error(self) -> None:
        """Write a pending log line on the way out of a failed step where the device still
        answers (a CUDA error would only hide the original one)."""
        try:
            self._settle(self._flags.drain())  # the logged step's flags, if still unread
            self._finish_log()
        except Exception as err:  # noqa: BLE001 - the original error is re-raised
            log.warning("the log line of the last log step was lost: %s", err)

    def _make_wandb(self) -> Any:
        from mmpretrain.logging.wandb_logger import WandbLogger

        lc = self.cfg.logging
        return WandbLogger(lc.wandb_mode, lc.wandb_project, self.cfg.name, self.run_dir,
                           to_dict(self.cfg), enabled=self.rank == 0)

    def _progress(self) -> Any:
        if self.rank != 0 or not self.cfg.logging.progress or not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.optim.steps, initial=self.step, unit="step", leave=False)

    def train(self) -> dict[str, Any]:
        """Resume if asked, train to `optim.steps`, checkpoint, evaluate; returns a summary."""
        cfg = self.cfg
        self.resume()
        self._install_signal_handlers()
        self._wandb, bar, status = self._make_wandb(), self._progress(), "finished"
        self._meter, self._window = StepMeter(), LossWindow(self.world)
        batches = iter(self.stream)
        self.engine.train()
        try:
            while self.step < cfg.optim.steps:
                self._one_step(batches)
                if bar is not None:
                    bar.update(1)
                status = self._after_step()
                if status != "running":
                    break
        except BaseException:
            self._finish_log_after_error()
            raise
        self._finish_log()  # the line of a step that stopped the run (a stop signal)
        status = "finished" if status == "running" else status
        if bar is not None:
            bar.close()
        summary: dict[str, Any] = {"status": status, "step": self.step,
                                   "skipped_steps": self.skipped_steps,
                                   "run_dir": str(self.run_dir)}
        if status != "preempted" and cfg.checkpoint.save_final and not self.ckpt.has_step(
                self.step):
            self.save()
        if status == "finished" and cfg.eval.at_end:
            if self._last_eval[0] == self.step:  # `eval.every` just evaluated this step
                summary.update(self._last_eval[1])
            else:
                summary.update(self.evaluate())
                self._log_eval(summary, self._wandb)
        self._wandb.finish()
        return summary

    def _one_step(self, batches: Any) -> None:
        """Fetch `grad_accum` micro-batches, take one optimizer step, update the counters."""
        cfg = self.cfg
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(cfg.engine.grad_accum)]
        data_time = time.perf_counter() - t0
        self._log_now = (self.step + 1) % cfg.logging.log_every == 0 or (
            self.step + 1 == cfg.optim.steps)
        self._window.add(self.train_step(micro, want_grad_norm=self._log_now))
        self.step += 1
        self.samples_seen += self.global_batch
        self._meter.update(self.global_batch, data_time)
        # This step's flags are read after the next step is queued (no host sync per step).
        self._settle(self._flags.push(self.step, self._client_optimizer.skip_flag,
                                      self._stop_signal is not None))

    def run_steps(self, n: int, batches: Any = None) -> tuple[StepMeter, dict[str, torch.Tensor]]:
        """Take `n` optimizer steps and nothing else (no resume, logging, signal checks,
        checkpoints or evaluation): the entry of `mmpretrain bench train` (`engine/bench.py`).
        Batches come from the iterator `batches`, else from the data stream (one iterator kept
        across calls). Returns these steps' meter and summed losses (on device, not synced)."""
        if batches is None:
            if getattr(self, "_stream_iter", None) is None:
                self._stream_iter = iter(self.stream)
            batches = self._stream_iter
        self._meter, self._window = StepMeter(), LossWindow(self.world)
        self.engine.train()
        for _ in range(n):
            self._one_step(batches)
        return self._meter, self._window.sums

    def _after_step(self) -> str:
        """Logging, signals, stops, checkpoints and evals after a step; returns the status."""
        cfg, step = self.cfg, self.step
        stop_after = bool(cfg.optim.stop_after and step >= cfg.optim.stop_after)
        save_due = bool(cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
        eval_due = bool(cfg.eval.every and step % cfg.eval.every == 0)
        self._finish_log()  # the previous log step's line (read when this step was queued)
        exact = stop_after or save_due or eval_due or step >= cfg.optim.steps
        if exact:
            # read every flag so far, this step's too (waits for this step, only on such
            # steps), so counters and stop decisions are exact where they are used
            self._settle(self._flags.drain())
        if self._log_now:
            self._start_log()
            if exact:
                self._finish_log()
        if self._too_many_skipped is not None:
            self.save()  # skipped steps change no weights: these are the last good ones
            raise NonFiniteTrainingError(
                f"{self._too_many_skipped[1]} steps in a row up to step "
                f"{self._too_many_skipped[0]} had a non-finite loss or gradient (limit "
                f"optim.max_skipped_steps={cfg.optim.max_skipped_steps}); stopped at step "
                f"{step} with a checkpoint of the last good weights in "
                f"{self.ckpt.dir}. Lower optim.lr or check the data.")
        if self._stop_seen:
            log.warning("stop signal received: saving at step %d and exiting", step)
            self.save()
            return "preempted"
        if stop_after:
            return "stopped"
        if save_due:
            self.save()
        if eval_due:
            self._last_eval = (step, self.evaluate())
            self._log_eval(self._last_eval[1], self._wandb)
            self._meter.reset()  # evaluation time is not training throughput
        return "running"

    # ---- evaluation ----------------------------------------------------------------------
    def _log_eval(self, metrics: dict[str, Any], wandb: Any) -> None:
        evals = {k: v for k, v in metrics.items() if k.startswith(EVAL_PREFIXES)}
        if self.rank == 0 and evals:
            self.jsonl.write({"step": self.step, **evals})
            wandb.log(evals, step=self.step)
            log.info("eval step %d: %s", self.step, format_metrics(evals))

    def evaluate(self) -> dict[str, Any]:
        """The configured evaluations (zero-shot, retrieval, ...; every rank takes part)."""
        from mmpretrain.eval.setup import run_evals

        self.engine.eval()
        try:
            return run_evals(self.cfg, self._eval_task(), self.tokenizer, self.rank,
                             self.world, self.device)
        finally:
            self.engine.train()

    def _eval_task(self) -> Any:
        """What evaluation runs on. ZeRO-3 partitions every weight and gathers it inside each
        module call, a collective that would hang when ranks make different numbers of calls
        (uneven held-out shards, captions of different lengths): evaluate a full copy instead,
        gathered one parameter at a time (the same calls on every rank)."""
        if self.cfg.engine.zero_stage != 3:
            return self.task
        import deepspeed

        from mmpretrain.eval.setup import InferenceTask
        from mmpretrain.model import build_model

        with torch.device(self.device):
            model = build_model(self.cfg.model, self.cfg.loss.kind)
        dtype = next(self.task.model.parameters()).dtype
        src = dict(self.task.model.named_parameters())
        for name, dst in model.named_parameters():
            with deepspeed.zero.GatheredParameters([src[name]]):
                dst.data = src[name].data.detach().clone()
        return InferenceTask(model.to(dtype).eval(), self.cfg.data.mean, self.cfg.data.std)
