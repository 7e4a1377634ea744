"""Export a training checkpoint: consolidated safetensors and a `transformers` CLIPModel folder.

    mmpretrain export RUN_OR_CHECKPOINT OUT [--dtype fp32|bf16] [--no-hf] [--trust-checkpoint]

Input: a run directory (its newest complete checkpoint, its `config.yaml` and `tokenizer/`) or
one checkpoint directory `run/checkpoints/step_XXXXXXXX` (config from `../../config.yaml`).
No distributed job is started: ZeRO 1-3 shards are merged by DeepSpeed's offline
`zero_to_fp32` (fp32 master weights from the optimizer partitions); a stage-0 checkpoint is read
from `mp_rank_00_model_states.pt`, preferring the fp32 master copies that DeepSpeed's bf16/fp16
optimizer keeps there over the half-precision module weights.

Output (see docs/EXPORT.md):
    OUT/model.safetensors    every model weight under our names (fp32 or bf16), the resolved
                             config as YAML in the metadata
    OUT/config.yaml          the resolved config (`load_config` reads it)
    OUT/hf/                  config.json + model.safetensors (CLIPModel), tokenizer files,
                             preprocessor_config.json, mmpretrain_extra.json (what CLIPModel
                             cannot hold: SigLIP logit bias, unmapped weights, notes)
Reading never unpickles more than DeepSpeed's checkpoint format needs: torch.load with
`weights_only=True`, allowing DeepSpeed's three checkpoint classes (`--trust-checkpoint` lifts
that for checkpoints of other DeepSpeed versions).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

from mmpretrain.checkpoint.convert import (hf_config_dict, hf_incompatibilities,
                                           split_task_state, to_hf_state_dict)
from mmpretrain.checkpoint.manager import CheckpointManager, write_atomic
from mmpretrain.config.load import config_hash, load_config, to_yaml
from mmpretrain.config.schema import ExperimentConfig

log = logging.getLogger("mmpretrain.export")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODEL_FILE = "model.safetensors"
STAGE0_FILE = "mp_rank_00_model_states.pt"
EXTRA_FILE = "mmpretrain_extra.json"


FUSION_PREFIXES = ("decoder.", "fusion_head.")
"""Weights of the multimodal part (CoCa decoder, fusion head): no CLIPModel counterpart."""


class ExportError(RuntimeError):
    """The input cannot be exported as asked (the message says why and what to do)."""


@dataclass
class ExportReport:
    """What `export` read and wrote."""

    checkpoint: str
    step: int
    weights_from: str
    files: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ---- finding the checkpoint and its config -------------------------------------------------
def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, Path]:
    """(checkpoint dir, run dir) for a run directory or a `step_*` checkpoint directory."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p, p.parent.parent
    if (p / "checkpoints").is_dir():
        found = CheckpointManager(p / "checkpoints", 0, 0, 1).latest()
        if found is None:
            raise ExportError(f"{p} has no complete checkpoint under checkpoints/")
        return found, p
    if p.name == "checkpoints" and (found := CheckpointManager(p, 0, 0, 1).latest()):
        return found, p.parent
    raise ExportError(f"{p} is neither a run directory (with checkpoints/) nor a complete "
                      "checkpoint directory (with meta.json)")


def load_run_config(ckpt: Path, run_dir: Path) -> tuple[ExperimentConfig, dict[str, Any]]:
    """The run's resolved config and the checkpoint's meta.json (warns on a hash mismatch)."""
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise ExportError(f"no config.yaml in {run_dir}: export needs the run's resolved config")
    cfg = load_config(cfg_file)
    meta = json.loads((ckpt / "meta.json").read_text())
    if meta.get("config_hash") not in (None, config_hash(cfg)):
        log.warning("%s was saved with config hash %s but %s now hashes to %s (resumed with "
                    "another config, or the config schema changed since); building the model "
                    "from the current config.yaml",
                    ckpt, meta.get("config_hash"), cfg_file, config_hash(cfg))
    return cfg, meta


# ---- consolidation --------------------------------------------------------------------------
def _deepspeed_safe_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


class _RestrictedTorch:
    """Stands in for `torch` inside `zero_to_fp32`: `load` with weights_only=True."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        return safe_load(f, *args, **kwargs)


def safe_load(f: Any, *args: Any, trust: bool = False, **kwargs: Any) -> Any:
    """`torch.load` of a DeepSpeed file: tensors, plain data and DeepSpeed's three checkpoint
    classes only, unless `trust` (then anything, as DeepSpeed itself loads)."""
    kwargs["weights_only"] = not trust
    if trust:
        return torch.load(f, *args, **kwargs)
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch.load(f, *args, **kwargs)


@contextlib.contextmanager
def _restricted_loading(module: Any, enabled: bool) -> Iterator[None]:
    saved = module.torch
    if enabled:
        module.torch = _RestrictedTorch()
    try:
        yield
    finally:
        module.torch = saved


def _zero_state(ckpt: Path, trust: bool) -> dict[str, torch.Tensor]:
    """fp32 weights merged from the ZeRO 1/2/3 optimizer partitions of every rank."""
    from deepspeed.utils import zero_to_fp32

    try:
        with _restricted_loading(zero_to_fp32, not trust), \
                contextlib.redirect_stdout(sys.stderr):  # it prints progress to stdout
            state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(
                str(ckpt.parent), tag=ckpt.name)
    except Exception as exc:
        if not trust and isinstance(exc, pickle.UnpicklingError):
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
            what = found.group(1) if found else str(exc).splitlines()[0]
            raise ExportError(f"{ckpt}: the checkpoint holds an object outside the allow-list of "
                              f"safe types ({what}); rerun with --trust-checkpoint if you trust "
                              "its origin") from exc
        raise
    return state


def _optimizer_param_names(cfg: ExperimentConfig) -> list[list[str]]:
    """Names of the trainer's optimizer groups' parameters, in group order (meta device)."""
    from mmpretrain.engine.optim import param_group_names
    from mmpretrain.model import build_model, local_model_config
    from mmpretrain.model.task import build_task

    with torch.device("meta"):
        task = build_task(cfg, build_model(local_model_config(cfg.model), cfg.loss.kind))
    return param_group_names(task)


def _master_tensors(optim: Any) -> list[list[torch.Tensor]] | None:
    """fp32 master weights per group from a stage-0 FP16/BF16 optimizer state, if present."""
    if not isinstance(optim, dict):
        return None
    if "fp32_groups" in optim:  # FP16_UnfusedOptimizer (torch optimizers): one tensor per param
        return [list(g) for g in optim["fp32_groups"]]
    if "fp32_groups_flat" in optim:  # FP16_Optimizer (fused): one flat tensor per group
        return [[flat] for flat in optim["fp32_groups_flat"]]
    return None


def _apply_masters(module: dict[str, torch.Tensor], names: list[list[str]],
                   masters: list[list[torch.Tensor]]) -> list[str]:
    """Replace module weights by their fp32 masters in place; returns problems (none: ok)."""
    if len(names) != len(masters):
        return [f"{len(masters)} master groups but {len(names)} optimizer groups"]
    updates: dict[str, torch.Tensor] = {}
    for group_names, group in zip(names, masters):
        shapes = [module[n].shape for n in group_names if n in module]
        if len(shapes) != len(group_names):
            return ["optimizer parameter names missing from the module state"]
        if len(group) == 1 and len(group_names) > 1:  # flat group: split by numel
            group = list(group[0].split([s.numel() for s in shapes]))
        if len(group) != len(group_names):
            return [f"group of {len(group)} masters for {len(group_names)} parameters"]
        for name, shape, master in zip(group_names, shapes, group):
            master = master.float().reshape(shape)
            if not torch.equal(master.to(module[name].dtype), module[name]):
                return [f"{name}: the fp32 master does not round to the module weight"]
            updates[name] = master
    module.update(updates)
    return []


def _stage0_state(ckpt: Path, cfg: ExperimentConfig,
                  trust: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """Weights of a ZeRO-0 checkpoint: fp32 masters when the optimizer kept them."""
    file = ckpt / STAGE0_FILE
    if not file.is_file():
        raise ExportError(f"{ckpt}: no {STAGE0_FILE} and no ZeRO optimizer shards")
    saved = safe_load(file, map_location="cpu", trust=trust)
    module = dict(saved["module"])
    dtypes = {v.dtype for v in module.values() if v.is_floating_point()}
    masters = _master_tensors(saved.get("optimizer"))
    if dtypes <= {torch.float32}:
        return module, "module weights (fp32 run)"
    if masters is None:
        log.warning("%s: half-precision module weights and no fp32 masters; exporting the "
                    "%s weights upcast to fp32", ckpt, dtypes)
        return module, "module weights (half precision, upcast)"
    # the order DeepSpeed recorded (checkpoints from before 2026-11-30 grouped differently)
    names = ([list(g) for g in saved["param_shapes"]] if saved.get("param_shapes")
             else _optimizer_param_names(cfg))
    problems = _apply_masters(module, names, masters)
    if problems:
        log.warning("%s: could not match the fp32 masters to parameters (%s); exporting the "
                    "half-precision module weights upcast", ckpt, problems[0])
        return module, "module weights (upcast)"
    return module, "fp32 master weights (stage-0 optimizer)"


def consolidate(ckpt: Path, cfg: ExperimentConfig,
                trust: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """Full fp32 state dict of the training task (keys `model.*`) and where it came from.

    Every key DeepSpeed saved is returned (nothing is filtered here); callers report extras."""
    if any(ckpt.glob("*_optim_states.pt")):
        state, desc = _zero_state(ckpt, trust), "fp32 master weights (ZeRO optimizer partitions)"
    else:
        state, desc = _stage0_state(ckpt, cfg, trust)
    return {k: v.detach().float() for k, v in state.items()}, desc


# ---- writing --------------------------------------------------------------------------------
def save_safetensors(path: Path, tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str]) -> None:
    """Write `tensors` (made contiguous, unshared) to `path` atomically."""
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(tmp),
              metadata={"format": "pt", **metadata})
    os.replace(tmp, path)


def find_tokenizer(run_dir: Path, cfg: ExperimentConfig) -> Any:
    """The run's tokenizer (`run_dir/tokenizer`, else `data.tokenizer`), or None (synthetic)."""
    from mmpretrain.data.tokenize import load_tokenizer

    if (run_dir / "tokenizer" / "tokenizer.json").is_file():
        return load_tokenizer(str(run_dir / "tokenizer"))
    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer)
    return None


def hf_tokenizer(tok: Any, context_length: int) -> Any:
    """A `PreTrainedTokenizerFast` giving the same rows as `tok.encode(texts, context_length)`
    when called with ``padding="max_length", truncation=True``.

    Our caption cleaning (lower-case, collapse whitespace) becomes the first normalizers, and
    sot/eot are added by a post-processor (truncation keeps room for them)."""
    import tokenizers
    from tokenizers import Regex, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    tk = tokenizers.Tokenizer.from_str(tok.to_str())
    clean = [normalizers.Lowercase(), normalizers.Replace(Regex(r"\s+"), " "),
             normalizers.Strip()]
    tk.normalizer = normalizers.Sequence(clean + ([tk.normalizer] if tk.normalizer else []))
    sot, eot = tok.specials["sot"], tok.specials["eot"]
    tk.post_processor = processors.TemplateProcessing(
        single=f"{sot} $A {eot}", pair=f"{sot} $A {eot} $B {eot}",
        special_tokens=[(sot, tok.sot_id), (eot, tok.eot_id)])
    kwargs = {"unk_token": tok.specials["unk"]} if "unk" in tok.specials else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token=tok.specials["pad"], bos_token=sot, eos_token=eot,
        model_max_length=context_length, padding_side="right", **kwargs)


def save_hf_tokenizer(tok: Any, out: Path, context_length: int) -> None:
    """Save `hf_tokenizer(...)` so `AutoTokenizer.from_pretrained(out)` loads it (transformers
    4.x and 5.x: the class is recorded as `PreTrainedTokenizerFast`)."""
    hf_tokenizer(tok, context_length).save_pretrained(str(out))
    cfg_file = out / "tokenizer_config.json"
    data = json.loads(cfg_file.read_text())
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    data.pop("backend", None)
    write_atomic(cfg_file, json.dumps(data, indent=2))


def preprocessor_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """CLIPImageProcessor settings matching our eval transform: shorter side resized to
    image_size (bicubic), center crop, x/255, (x - mean) / std."""
    size = cfg.model.vision.image_size
    return {"image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True,
            "do_resize": True, "size": {"shortest_edge": size}, "resample": 3,
            "do_center_crop": True, "crop_size": {"height": size, "width": size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(cfg.data.mean), "image_std": list(cfg.data.std)}


def _extra_info(cfg: ExperimentConfig, model_state: dict[str, torch.Tensor],
                unmapped: dict[str, torch.Tensor], specials: dict[str, int]) -> dict[str, Any]:
    """mmpretrain_extra.json: what CLIPModel cannot hold, and how to use the export."""
    bias = model_state.get("logit_bias")
    scale = float(model_state["logit_scale"].reshape(()))
    return {
        "format": 1, "loss": cfg.loss.kind,
        "logit_bias": None if bias is None else float(bias.reshape(())),
        "logit_scale": scale, "max_logit_scale": cfg.model.max_logit_scale,
        "logit_scale_clamped": scale > math.log(cfg.model.max_logit_scale),
        "unmapped": {k: list(v.shape) for k, v in unmapped.items()},
        "unmapped_note": "weights CLIPModel has no place for; their values are in "
                         f"../{MODEL_FILE} under these names",
        "text": {"context_length": cfg.model.text.context_length, **specials,
                 "pooling": "first end-of-text token (eos_token_id)"},
        "image": {"image_size": cfg.model.vision.image_size, "pool": cfg.model.vision.pool,
                  "mean": list(cfg.data.mean), "std": list(cfg.data.std)},
        "siglip_logits": "logit_scale.exp() * cosine + logit_bias" if bias is not None else None,
    }


def _check_hf_keys(config: Any, hf_state: dict[str, torch.Tensor]) -> None:
    from transformers import CLIPModel

    with torch.device("meta"):
        expected = {k: v.shape for k, v in CLIPModel(config).state_dict().items()}
    bad = sorted(set(expected) ^ set(hf_state)) + sorted(
        k for k in hf_state if k in expected and hf_state[k].shape != expected[k])
    if bad:
        raise ExportError(f"converted weights do not fit CLIPModel: {bad[:10]}")


@dataclass
class HFExport:
    """A CLIPModel export prepared in memory (nothing written yet)."""

    config: Any
    state: dict[str, torch.Tensor]
    unmapped: dict[str, torch.Tensor]
    ids: dict[str, int]
    tokenizer: Any


def prepare_hf(model_state: dict[str, torch.Tensor], cfg: ExperimentConfig,
               tokenizer: Any) -> HFExport:
    """CLIPConfig + CLIPModel weights for our weights; ExportError when they do not fit."""
    from transformers import CLIPConfig

    from mmpretrain.model import build_model, local_model_config

    with torch.device("meta"):
        model = build_model(local_model_config(cfg.model), cfg.loss.kind)
    ids = ({"pad": tokenizer.pad_id, "sot": tokenizer.sot_id, "eot": tokenizer.eot_id}
           if tokenizer is not None else {"pad": 0, "sot": 2, "eot": 3})  # synthetic rows
    try:
        config = CLIPConfig(**hf_config_dict(cfg.model, model, ids))
    except ValueError as exc:
        raise ExportError(f"cannot describe the model as a transformers.CLIPModel: {exc}. "
                          "Use --no-hf to write only model.safetensors.") from exc
    hf_state, unmapped = to_hf_state_dict(model_state, cfg.model.max_logit_scale)
    _check_hf_keys(config, hf_state)
    return HFExport(config, hf_state, unmapped, ids, tokenizer)


def write_hf(out: Path, prep: HFExport, model_state: dict[str, torch.Tensor],
             cfg: ExperimentConfig, dtype: torch.dtype) -> None:
    """Write the CLIPModel folder: config, weights, tokenizer, image processor, extras."""
    out.mkdir(parents=True, exist_ok=True)
    prep.config.dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    prep.config.save_pretrained(str(out))
    save_safetensors(out / MODEL_FILE, {k: v.to(dtype) for k, v in prep.state.items()}, {})
    write_atomic(out / "preprocessor_config.json", json.dumps(preprocessor_config(cfg), indent=2))
    if prep.tokenizer is not None:
        save_hf_tokenizer(prep.tokenizer, out, cfg.model.text.context_length)
    extra = _extra_info(cfg, model_state, prep.unmapped,
                        {f"{k}_id": v for k, v in prep.ids.items()})
    write_atomic(out / EXTRA_FILE, json.dumps(extra, indent=1))


def _check_model_keys(cfg: ExperimentConfig, state: dict[str, torch.Tensor]) -> list[str]:
    """Raise if weights of the configured model are missing or misshapen; return extra keys."""
    from mmpretrain.model import build_model, local_model_config

    with torch.device("meta"):
        model = build_model(local_model_config(cfg.model), cfg.loss.kind)
        expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(k for k in expected if k not in state)
    wrong = sorted(k for k in expected if k in state and state[k].shape != expected[k])
    if missing or wrong:
        raise ExportError(f"the checkpoint does not match the run's model config: missing "
                          f"{missing[:5]}, wrong shape {wrong[:5]}")
    return sorted(k for k in state if k not in expected)


def export(source: str | os.PathLike, out: str | os.PathLike, dtype: str = "fp32",
           hf: bool = True, trust_checkpoint: bool = False) -> ExportReport:
    """Export the checkpoint `source` (run or `step_*` directory) to `out` (see module doc)."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    ckpt, run_dir = resolve_checkpoint(source)
    cfg, meta = load_run_config(ckpt, run_dir)
    problems = hf_incompatibilities(cfg.model) if hf else []
    if problems:
        raise ExportError("cannot export to transformers.CLIPModel: " + "; ".join(problems) +
                          ". Use --no-hf to write only model.safetensors.")
    task_state, source_desc = consolidate(ckpt, cfg, trust_checkpoint)
    state, rest = split_task_state(task_state)
    report = ExportReport(str(ckpt), int(meta.get("step", -1)), source_desc, dropped=sorted(rest))
    report.warnings += [f"{k}: not a weight of the configured model; kept in {MODEL_FILE}"
                        for k in _check_model_keys(cfg, state)]
    prep = None
    if hf:
        tokenizer = find_tokenizer(run_dir, cfg)
        if tokenizer is None:
            report.warnings.append("no tokenizer in the run (synthetic data): hf/ has none")
        prep = prepare_hf(state, cfg, tokenizer)
        report.unmapped = sorted(prep.unmapped)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"mmpretrain_config": to_yaml(cfg), "mmpretrain_step": str(report.step),
                "mmpretrain_config_hash": config_hash(cfg), "mmpretrain_source": str(ckpt),
                "mmpretrain_weights_from": source_desc}
    save_safetensors(out / MODEL_FILE, {k: v.to(DTYPES[dtype]) for k, v in state.items()},
                     metadata)
    write_atomic(out / "config.yaml", to_yaml(cfg))
    report.files += [str(out / MODEL_FILE), str(out / "config.yaml")]
    if prep is not None:
        write_hf(out / "hf", prep, state, cfg, DTYPES[dtype])
        report.files.append(str(out / "hf"))
    fusion = [n for n in report.unmapped if n.startswith(FUSION_PREFIXES)]
    if fusion:
        report.warnings.append(
            f"{len(fusion)} tensors of the caption decoder / fusion head (decoder.*, "
            f"fusion_head.*): hf/ holds the contrastive two-tower part only; the full model is "
            f"in {MODEL_FILE}")
    for name in report.unmapped:
        if not name.startswith(FUSION_PREFIXES):
            report.warnings.append(f"{name}: no transformers.CLIPModel counterpart; kept in "
                                   f"{MODEL_FILE}, listed in hf/{EXTRA_FILE}")
    for name in report.dropped:
        report.warnings.append(f"{name}: not a model weight (task key), not exported")
    return report


def load_exported(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ExperimentConfig]:
    """Read `OUT/model.safetensors` back: (our state dict, the embedded config)."""
    import tempfile

    from safetensors import safe_open

    file = Path(path) / MODEL_FILE if Path(path).is_dir() else Path(path)
    with safe_open(str(file), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        text = f.metadata()["mmpretrain_config"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(text)
        return state, load_config(Path(tmp) / "config.yaml")
