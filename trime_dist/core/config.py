"""Config loading for every stage: defaults < YAML < `a.b=c` overrides, strict keys and types.

Loading goes through OmegaConf structured configs, which reject unknown keys and wrong types
with the full key path. The stage config dataclasses live with their stages.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, reported before any work starts."""


def load_config(cls: type[T], yaml_path: Optional[str] = None, overrides: Sequence[str] = (), *,
                values: Optional[dict] = None, where: str = "") -> T:
    """Build `cls` from its defaults, then the YAML file (or a dict `values` read from `where`), then
    `a.b=c` overrides (strict keys and types)."""
    try:
        merged = OmegaConf.structured(cls)
        if yaml_path:
            merged = OmegaConf.merge(merged, read_yaml(yaml_path))
        if values is not None:
            yaml_path = where or yaml_path
            merged = OmegaConf.merge(merged, values)
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key.path=value")
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        # OmegaConf's message names the full key and the expected type; keep its first lines.
        msg = str(e).strip().splitlines()
        where = f" (in {yaml_path})" if yaml_path else ""
        raise ConfigError(f"invalid configuration{where}: " + " ".join(m.strip() for m in msg[:3])) from None


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


def save_config(cfg: Any, path: str) -> None:
    """Write the resolved config as YAML (atomically)."""
    from trime_dist.core.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(_plain(config_to_dict(cfg)), sort_keys=False))


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
