"""Config for every stage: dataclass fields declared with `opt` (default + one-line doc), loaded as
defaults < YAML < values < flags < `a.b=c` overrides with strict keys, types and choices.

Loading goes through OmegaConf structured configs, which reject unknown keys and wrong types with the
full key path; each error also names where the bad value came from. Stage config dataclasses live with
their stages; `config_help` lists their keys with the docs.
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from typing import Any, Callable, Optional, Sequence, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")
COMMAND_LINE = "on the command line"


class ConfigError(ValueError):
    """A configuration problem, reported before any work starts."""


def opt(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Optional[Callable[[], Any]] = None,
        choices: Optional[Sequence] = None, repeat: bool = False, metavar: Optional[str] = None) -> Any:
    """A config field with its one-line doc: `lr: float = opt(1e-3, "peak learning rate")`.

    factory: a fresh default per instance (lists, dicts, nested configs), as dataclasses' default_factory.
    choices: the allowed values (of every item for a list), enforced at load time and by the flag.
    repeat, metavar: for a list's command-line flag: `--x A --x B` instead of `--x A B`; the value's name.
    """
    meta: dict[str, Any] = {"help": doc}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if repeat:
        meta["repeat"] = True
    if metavar:
        meta["metavar"] = metavar
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (a fresh one from its factory)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def type_name(typ: Any) -> str:
    """`int`, `Optional[str]`, `dict[str, StageResources]`: a type as a reader writes it."""
    if isinstance(typ, type) and not typing.get_args(typ):
        return typ.__name__
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", str(typ).replace("typing.", ""))


def config_help(cls: type, prefix: str = "") -> str:
    """One line per leaf key: `  model.n_layers (int, default 2): transformer blocks`."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            lines.append(config_help(typ, f"{prefix}{f.name}."))
            continue
        info = f"{type_name(typ)}, default {field_default(f)!r}"
        if "choices" in f.metadata:
            info += ", one of " + " | ".join(str(c) for c in f.metadata["choices"])
        doc = f.metadata.get("help", "")
        lines.append(f"  {prefix}{f.name} ({info})" + (f": {doc}" if doc else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- loading

def load_config(cls: type[T], yaml_path: Optional[str] = None, overrides: Sequence[str] = (), *,
                values: Optional[dict] = None, where: str = "", flags: Optional[dict] = None) -> T:
    """Build `cls` from its defaults, then the YAML file, then a dict `values` read from `where`, then
    `flags` (values parsed from command-line flags), then `a.b=c` overrides from the command line.

    Keys, types and `choices` are strict; a ConfigError names the key and the layer that set it."""
    layers: list[tuple[str, Callable[[], Any]]] = []
    if yaml_path:
        layers.append((f"in {yaml_path}", lambda: read_yaml(yaml_path)))
    if values is not None:
        layers.append((f"in {where or 'the values given'}", lambda: values))
    if flags:
        layers.append((COMMAND_LINE, lambda: flags))
    if overrides:
        layers.append((COMMAND_LINE, lambda: _parse_overrides(overrides)))
    merged = _in_layer(f"in the defaults of {cls.__name__}", lambda: OmegaConf.structured(cls))
    for source, read in layers:
        data = _in_layer(source, read)
        merged = _in_layer(source, lambda: OmegaConf.merge(merged, data))
        _check_choices(cls, merged, data, source)
    return _in_layer("", lambda: OmegaConf.to_object(merged))


def _parse_overrides(overrides: Sequence[str]) -> dict:
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"invalid configuration ({COMMAND_LINE}): override {bad[0]!r} is not of the form "
                          "key.path=value")
    return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))


def _in_layer(source: str, step: Callable[[], Any]) -> Any:
    """Run one loading step; an OmegaConf or YAML error becomes a ConfigError naming `source`."""
    try:
        return step()
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        # OmegaConf's message names the full key and the expected type; keep its first lines.
        msg = str(e).strip().splitlines()
        where = f" ({source})" if source else ""
        raise ConfigError(f"invalid configuration{where}: " + " ".join(m.strip() for m in msg[:3])) from None


def _check_choices(cls: type, merged: DictConfig, data: Any, source: str, prefix: str = "") -> None:
    """Every value this layer set (`data`) is among its field's `choices` (every item, for a list)."""
    if not isinstance(data, dict):
        return
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = merged[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            _check_choices(hints[f.name], value, data[f.name], source, f"{prefix}{f.name}.")
        elif "choices" in f.metadata and value is not None:
            choices = f.metadata["choices"]
            for item in (value if isinstance(value, Sequence) and not isinstance(value, str) else [value]):
                if item not in choices:
                    raise ConfigError(f"invalid configuration ({source}): {prefix}{f.name}: got {item!r}, "
                                      f"allowed: {', '.join(str(c) for c in choices)}")


def read_yaml(path: str) -> dict:
    """A YAML file's top-level mapping; ConfigError naming the file when it is missing or not a mapping."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            loaded = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
    return loaded


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_yaml(cfg: Any) -> str:
    """The resolved config as YAML text (tuples written as lists)."""
    return yaml.safe_dump(_plain(config_to_dict(cfg)), sort_keys=False)


def save_config(cfg: Any, path: str) -> None:
    """Write the resolved config as YAML (atomically)."""
    from trime_dist.core.io import atomic_write_text

    atomic_write_text(path, config_yaml(cfg))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def require(ok: bool, key: str, msg: str) -> None:
    """Raise ConfigError naming `key` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}: {msg}")
