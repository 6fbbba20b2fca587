"""Configuration: the schema (documented fields, one meaning per batch size) and its YAML/override loader."""

from rollflow.config.loader import ConfigError, dump_config, load_config
from rollflow.config.schema import Config

__all__ = ["Config", "ConfigError", "dump_config", "load_config"]
