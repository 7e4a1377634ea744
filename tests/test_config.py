"""Config: every shipped YAML loads; inheritance, overrides and errors that name the key."""
from pathlib import Path

import pytest

from mmpretrain.config import schema
from mmpretrain.config.load import (CONFIG_ROOT, ConfigError, config_hash, load_config,
                                    to_yaml)

ALL_YAML = sorted(CONFIG_ROOT.rglob("*.yaml"))


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIG_ROOT)))
def test_every_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, schema.ExperimentConfig)


def test_resolved_yaml_roundtrip(tmp_path: Path) -> None:
    cfg = load_config(CONFIG_ROOT / "experiments/siglip_vit_b16.yaml", ["optim.lr=3e-4"])
    f = tmp_path / "resolved.yaml"
    f.write_text(to_yaml(cfg))
    again = load_config(f)
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert cfg.optim.lr == 3e-4


def test_inheritance_chain() -> None:
    cfg = load_config("experiments/siglip_vit_b16.yaml")
    assert cfg.loss.kind == "siglip"                 # own value
    assert cfg.engine.zero_stage == 2                # from clip_vit_b16 -> engine/zero2
    assert cfg.model.vision.patch_size == 16         # from the vit_b16 size
    assert cfg.model.text.vocab_size == 49408
    assert cfg.name == "siglip_vit_b16"


def test_overrides_are_typed_and_win() -> None:
    cfg = load_config("experiments/clip_vit_b16.yaml",
                      ["model.vision.width=384", "optim.betas=[0.9, 0.95]", "optim.lr=1",
                       "engine.offload_optimizer=true", "name=x"])
    assert cfg.model.vision.width == 384 and cfg.model.vision.layers == 12
    assert cfg.optim.betas == [0.9, 0.95]
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0  # int widens to float
    assert cfg.engine.offload_optimizer is True and cfg.name == "x"


def test_size_preset_then_explicit_values() -> None:
    cfg = load_config(None, ["model.size=vit_l14", "model.text.layers=6"])
    assert cfg.model.vision.width == 1024 and cfg.model.text.layers == 6
    assert cfg.model.embed_dim == 768


@pytest.mark.parametrize("override, words", [
    ("model.vison.width=384", ["model.vison", "did you mean 'model.vision'"]),
    ("optim.lrr=0.1", ["optim.lrr", "did you mean 'optim.lr'"]),
    ("optmi.lr=0.1", ["optmi", "did you mean 'optim'"]),
    ("optim.lr=fast", ["optim.lr", "expected float"]),
    ("optim.steps=1.5", ["optim.steps", "expected int"]),
    ("engine.offload_optimizer=1", ["engine.offload_optimizer", "expected bool"]),
    ("engine.precision=bf61", ["engine.precision", "did you mean 'bf16'"]),
    ("model.size=vit_b61", ["model.size", "did you mean 'vit_b16'"]),
    ("engine.zero_stage=4", ["engine.zero_stage"]),
    ("engine.offload_params=true", ["engine.offload_params", "engine.zero_stage=3"]),
    ("optim.betas=0.9", ["optim.betas", "expected a list"]),
])
def test_bad_keys_and_values_name_the_key(override: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("experiments/demo_digits.yaml", [override])
    for w in words:
        assert w in str(err.value)


def test_unknown_key_in_yaml_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("base: experiments/demo_digits.yaml\ndata:\n  batchsize: 8\n")
    with pytest.raises(ConfigError, match="data.batchsize.*did you mean 'data.batch_size'"):
        load_config(f)


def test_base_cycle_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found: nowhere.yaml"):
        load_config("nowhere.yaml")


def test_every_field_has_a_docstring() -> None:
    missing = [key for key, f, owner in schema.iter_fields(schema.ExperimentConfig)
               if not schema.field_docs(owner).get(f.name)]
    assert not missing, f"fields without documentation: {missing}"
    for cls in (schema.DataConfig, schema.ModelConfig, schema.ExperimentConfig):
        assert cls.__doc__
