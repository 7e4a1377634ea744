"""Typed configuration: the schema and its loader."""
from mmpretrain.config.load import ConfigError, load_config
from mmpretrain.config.schema import ExperimentConfig

__all__ = ["ConfigError", "ExperimentConfig", "load_config"]
