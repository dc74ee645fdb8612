"""Command-line flags generated from a stage's config dataclass, so help and defaults cannot drift.

A field's help text is its `metadata["help"]`; `--config FILE.yaml` supplies a base that flags override.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one `--field-name` flag per field of `cls` (defaults left to the dataclass)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        typ = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f.metadata.get("help", "")
        help_text = f"{help_text} (default: {default!r})" if help_text else f"(default: {default!r})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        origin = typing.get_origin(typ)
        if typ is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin in (list, tuple):
            (item,) = set(typing.get_args(typ)) - {Ellipsis}
            kwargs.update(nargs="+", type=item)
        elif origin is typing.Union:  # Optional[X]
            (item,) = [a for a in typing.get_args(typ) if a is not type(None)]
            kwargs["type"] = item
        else:
            kwargs["type"] = typ
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(flag, **kwargs)
    parser.add_argument("--config", dest="config_file", default=None,
                        help="YAML file with any of the fields above as keys; flags override it")


def dataclass_from_flags(cls: type[T], args: argparse.Namespace) -> T:
    """Defaults < --config YAML < flags; unknown YAML keys and wrong types are rejected."""
    from trime_dist.core.config import load_config

    names = {f.name for f in dataclasses.fields(cls)}
    overrides = []
    for name in names:
        if hasattr(args, name):
            value = getattr(args, name)
            overrides.append(f"{name}={_as_dotlist_value(value)}")
    return load_config(cls, getattr(args, "config_file", None), overrides)


def _as_dotlist_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_as_dotlist_value(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, str):
        return "'" + value.replace("'", "\\'") + "'"
    return str(value)
