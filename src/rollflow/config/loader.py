"""Loading a config: YAML file, then ``key.sub=value`` overrides, merged by OmegaConf and validated by pydantic.

Every problem is reported at once, before any work starts, each naming its dotted key and what is expected;
a misspelt key gets the closest valid one suggested. A YAML error names the file, line and column; a key given twice
in one mapping of the file is an error (YAML would silently keep the last); NaN and infinity are refused everywhere.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Hashable, Iterator, Sequence
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, Hashable):
                continue  # PyYAML's own construction reports an unhashable key
            if key in seen:
                raise ConfigError(f"key {key!r} is given twice in one mapping (lines {seen[key]} and {line}); "
                                  "YAML would silently keep only the last: merge them into one")
            seen[key] = line
        return super().construct_mapping(node, deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """Where and what, without PyYAML's "<unicode string>" marks."""
    mark = getattr(e, "problem_mark", None)
    if mark is None:
        return str(e)
    text = f"line {mark.line + 1}, column {mark.column + 1}: {e.problem}"  # type: ignore[attr-defined]
    context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context:
        where = f" at line {context_mark.line + 1}, column {context_mark.column + 1}" if context_mark else ""
        text += f" ({context}{where})"
    snippet = mark.get_snippet()
    return f"{text}\n{snippet}" if snippet else text


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a directory; give the YAML file inside it")
    if not path.is_file():
        where = "" if path.is_absolute() else f" (a relative path is read from the working directory '{Path.cwd()}')"
        raise ConfigError(f"config file '{path}' does not exist{where}; check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {e.start}); give a YAML file") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(f"config file '{path}': {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {_yaml_problem(e)}") from None
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
            single = OmegaConf.from_dotlist([item])
            key, text = item.split("=", 1)
            if text.strip().startswith("{"):  # key={...} sets the mapping (e.g. {} empties it), not merged into it
                OmegaConf.update(merged, key, OmegaConf.select(single, key), merge=False)
            else:
                merged = OmegaConf.merge(merged, single)
        except OmegaConfBaseException as e:
            raise ConfigError(f"override '{item}' could not be applied: {e}") from None
    try:
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{key or 'config'}: cannot resolve the interpolation in it ({type(e).__name__}: "
                          f"{str(e).splitlines()[0]}); fix the ${{...}} reference or give a plain value") from None
    if isinstance(data.get("task"), dict):  # a task section without a name configures the default task
        data["task"].setdefault("name", Config.model_fields["task"].default_factory().name)
    problems: set[str] = set()
    config = None
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        problems = {_describe(err) for err in e.errors()}
    # The validated values when there are some: pydantic turns the string 'nan' into a float NaN.
    for key, value in _non_finite(config.model_dump() if config is not None else data):
        if not any(p.startswith(f"{key}:") for p in problems):
            problems.add(f"{key}: must be a finite number (got {value!r}); give a number, or null where the key allows it")
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(f"  - {p}" for p in sorted(problems)))
    return config


def _non_finite(data: Any, key: str = "") -> Iterator[tuple[str, float]]:
    """(dotted key, value) of every NaN or infinite float in nested ``data``."""
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _non_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _non_finite(v, f"{key}[{i}]")
    elif isinstance(data, float) and not math.isfinite(data):
        yield key, data


def dump_config(config: Config) -> str:
    """The fully resolved config as YAML: every field, defaults included."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
