"""Loading a config: YAML file, then ``key.sub=value`` overrides, merged by OmegaConf and validated by pydantic.

Every problem is reported at once, before any work starts, each naming its dotted key and what is expected;
a misspelt key gets the closest valid one suggested.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ValidationError

from rollflow.config.schema import Config


class ConfigError(ValueError):
    """The configuration is invalid; the message lists every problem."""


def _union_members(annotation: Any) -> dict[str, type[BaseModel]]:
    """For a discriminated union of sections: tag value → section class."""
    members = {}
    for arg in get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel) and "name" in arg.model_fields:
            members[arg.model_fields["name"].default] = arg
    return members


def _walk(loc: Sequence[str | int]) -> tuple[list[str], type[BaseModel] | None]:
    """Turn a pydantic error location into dotted key parts (dropping union tags) and the section it ends in."""
    parts: list[str] = []
    model: type[BaseModel] | None = Config
    i = 0
    while i < len(loc):
        item = str(loc[i])
        parts.append(item)
        field = model.model_fields.get(item) if model else None
        model = None
        if field is not None:
            members = _union_members(field.annotation) if field.discriminator else {}
            if members and i + 1 < len(loc) and str(loc[i + 1]) in members:
                model = members[str(loc[i + 1])]
                i += 1  # skip the tag pydantic inserts into the location
            elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                model = field.annotation
        i += 1
    return parts, model


def _describe(err: dict[str, Any]) -> str:
    parts, _ = _walk(err["loc"])
    key = ".".join(parts)
    if err["type"] == "extra_forbidden":
        _, parent = _walk(err["loc"][:-1])
        valid = list((parent or Config).model_fields)
        close = difflib.get_close_matches(parts[-1], valid, n=1, cutoff=0.6)
        hint = f"did you mean '{'.'.join([*parts[:-1], close[0]])}'?" if close else f"valid keys here: {', '.join(valid)}"
        return f"unknown key '{key}'; {hint}"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error" and (not key or msg.startswith(f"{key.split('.')[0]}.")):
        return msg  # a cross-field check that names its own keys
    if err["type"] == "union_tag_invalid":
        return f"{key}.name: {msg}"
    if err["type"] == "missing":
        return f"{key}: required but not set"
    return f"{key}: {msg} (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else f"{key}: {msg}"


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys to values, not a {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults ← YAML file (if any) ← overrides, validated. Raises ``ConfigError`` listing every problem."""
    merged = OmegaConf.create(_read_yaml(Path(path)) if path else {})
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0]:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value (e.g. train.lr=1e-4)")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise ConfigError(f"override '{item}' could not be applied: {e}") from None
    data = OmegaConf.to_container(merged, resolve=True)
    if isinstance(data.get("task"), dict):  # a task section without a name configures the default task
        data["task"].setdefault("name", Config.model_fields["task"].default_factory().name)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        problems = sorted({_describe(err) for err in e.errors()})
        raise ConfigError("invalid config:\n" + "\n".join(f"  - {p}" for p in problems)) from None


def dump_config(config: Config) -> str:
    """The fully resolved config as YAML: every field, defaults included."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
