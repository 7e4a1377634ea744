"""YAML + `base:` inheritance + dotted overrides -> a validated `ExperimentConfig`.

Order of precedence (later wins): dataclass defaults < the named model size (`model.size`) <
base files (in the order listed) < the file itself < command-line overrides. Every key is checked
against the schema: an unknown key or a value of the wrong type raises `ConfigError` naming the
dotted key and the closest valid one.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from mmpretrain.config.schema import ExperimentConfig
from mmpretrain.model.registry import MODEL_SIZES, preset

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(ValueError):
    """A config file, key or value that does not fit the schema."""


def deep_merge(base: dict, over: dict) -> dict:
    """Return `base` updated recursively by `over` (neither input is modified)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_config_path(path: str | os.PathLike, relative_to: Path | None = None) -> Path:
    """Find a config file: as given, relative to the including file, or under `configs/`."""
    p = Path(path)
    candidates = [p] if p.is_absolute() else [
        *([relative_to / p] if relative_to else []), Path.cwd() / p, CONFIG_ROOT / p]
    for c in candidates:
        for cand in (c, c.with_suffix(".yaml")) if c.suffix == "" else (c,):
            if cand.is_file():
                return cand.resolve()
    raise ConfigError(f"config file not found: {path} (looked in: "
                      f"{', '.join(str(c) for c in candidates)})")


def load_yaml_tree(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config and its `base:` files (recursively) into one merged dict."""
    file = resolve_config_path(path, _seen[-1].parent if _seen else None)
    if file in _seen:
        chain = " -> ".join(str(s) for s in (*_seen, file))
        raise ConfigError(f"config inheritance cycle: {chain}")
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{file}: invalid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: top level must be a mapping, got {type(raw).__name__}")
    bases = raw.pop("base", []) or []
    bases = [bases] if isinstance(bases, str) else bases
    merged: dict = {}
    for b in bases:
        base_tree = load_yaml_tree(b, (*_seen, file))
        merged = deep_merge(merged, base_tree)
    return deep_merge(merged, raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `a.b.c=value`; the value is read as YAML (`384` -> int, `[1, 2]` -> list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, value = text.split("=", 1)
    key = key.strip().removeprefix("--")
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Set each dotted override in a copy of `tree`."""
    out = copy.deepcopy(tree)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return out


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float)."""
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            close = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key}: {value!r} is not one of {_type_name(tp)}{hint}")
        return value
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(key, arg, value)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not of type {tp}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = get_args(tp)
        return [_coerce(f"{key}[{i}]", item_tp, v) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads `5e-4` (no dot) as a string
            return float(value)
        except ValueError:
            pass
    wrong = (not isinstance(value, bool) if tp is bool else
             tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool)))
    if wrong:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} "
                          f"{value!r}")
    return value


def _unknown_key(prefix: str, key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{prefix}{key}'{hint} (valid keys under "
                       f"'{prefix or '<top>'}': {', '.join(valid)})")


def build_dataclass(cls: type, tree: dict, prefix: str = "") -> Any:
    """Instantiate config dataclass `cls` from a nested dict, validating every key and value."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {tree!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in tree.items():
        if key not in valid:
            raise _unknown_key(prefix, str(key), valid)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_dataclass(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", tp, value)
    return cls(**kwargs)


def _apply_model_size(tree: dict) -> dict:
    """Fill the `model` subtree from the named size; explicit values win."""
    model = tree.get("model") or {}
    size = model.get("size", "tiny") if isinstance(model, dict) else "tiny"
    if not size:
        return tree
    if size not in MODEL_SIZES:
        close = difflib.get_close_matches(str(size), list(MODEL_SIZES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"model.size: unknown size {size!r}{hint} "
                          f"(known: {', '.join(MODEL_SIZES)})")
    out = dict(tree)
    out["model"] = deep_merge(preset(size), model)
    return out


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Cross-field checks that a single field's type cannot express."""
    checks = [
        (cfg.engine.zero_stage in (0, 1, 2, 3), "engine.zero_stage must be 0, 1, 2 or 3"),
        (cfg.engine.grad_accum >= 1, "engine.grad_accum must be >= 1"),
        (cfg.data.batch_size >= 1, "data.batch_size must be >= 1"),
        (cfg.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (cfg.optim.steps >= 1, "optim.steps must be >= 1"),
        (len(cfg.optim.betas) == 2, "optim.betas must have two values"),
        (len(cfg.data.mean) == 3 and len(cfg.data.std) == 3, "data.mean/std need 3 values"),
        (0.0 < cfg.data.crop_scale_min <= 1.0, "data.crop_scale_min must be in (0, 1]"),
        (not cfg.engine.offload_optimizer or cfg.engine.zero_stage >= 1,
         "engine.offload_optimizer needs engine.zero_stage >= 1"),
        (not cfg.engine.offload_params or (cfg.engine.zero_stage == 3
                                           and cfg.engine.offload_optimizer),
         "engine.offload_params needs engine.zero_stage=3 and engine.offload_optimizer=true"),
        (not cfg.model.attention_speeds or cfg.model.attention == "auto",
         "model.attention_speeds needs model.attention=auto (it chooses per shape; "
         f"model.attention={cfg.model.attention} forces one implementation everywhere)"),
        (cfg.engine.compile or cfg.engine.compile_mode == "default",
         "engine.compile_mode needs engine.compile=true"),
        (cfg.engine.compile or cfg.engine.compile_scope == "auto",
         "engine.compile_scope needs engine.compile=true"),
        (not cfg.engine.compile or cfg.engine.zero_stage <= 2,
         "engine.compile needs engine.zero_stage <= 2 (ZeRO-3 gathers and frees each weight in "
         "hooks around every module call, which torch.compile does not trace)"),
        (cfg.engine.float8 == "off" or cfg.engine.precision != "fp16",
         "engine.float8 needs engine.precision bf16 or fp32 (torchao's float8 recipes do not "
         "take fp16 weights)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    return cfg


def load_config(path: str | os.PathLike | None = None,
                overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a config file (or the defaults when `path` is None) with overrides applied."""
    tree = load_yaml_tree(path) if path else {}
    tree = apply_overrides(tree, list(overrides or []))
    tree = _apply_model_size(tree)
    return validate(build_dataclass(ExperimentConfig, tree))


def to_dict(cfg: Any) -> dict:
    """The config as plain data (for YAML/JSON)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML text, loadable by `load_config`."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_hash(cfg: ExperimentConfig) -> str:
    """A short hash of what defines the training trajectory (not logging/checkpoint cadence)."""
    d = to_dict(cfg)
    for key in ("logging", "checkpoint", "eval", "output_dir"):
        d.pop(key, None)
    d["optim"].pop("stop_after", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
