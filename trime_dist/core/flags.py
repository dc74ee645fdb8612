"""Command-line flags generated from a flat config dataclass, so flags, help and defaults cannot drift.

One `--field-name` flag per field, documented by the field's `opt` doc; `--config FILE.yaml` supplies a base
that the flags override. Loading (strict keys, types, choices) is trime_dist.core.config.load_config.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, TypeVar

from trime_dist.core.config import field_default, load_config

T = TypeVar("T")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, config_file: bool = True) -> None:
    """Add one `--field-name` flag per field of `cls` (defaults left to the dataclass), and `--config FILE`
    unless `config_file` is False (a stage whose own field is called `config`)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        parser.add_argument("--" + f.name.replace("_", "-"), **flag_kwargs(cls, f, hints[f.name]))
    if config_file:
        parser.add_argument("--config", dest="config_file", default=None, metavar="FILE",
                            help="YAML file with any of the fields above as keys; flags override it")


def flag_kwargs(cls: type, f: dataclasses.Field, typ: Any) -> dict[str, Any]:
    """argparse keywords for field `f` of type `typ`; an unset flag leaves no attribute (SUPPRESS)."""
    doc = f.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help texts
    default = field_default(f)
    shown = "" if default is None else f"(default: {default!r})"  # None: the doc says what unset means
    kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                              "help": " ".join(filter(None, [doc, shown]))}
    origin = typing.get_origin(typ)
    if origin is typing.Union:  # Optional[X]: the flag takes an X
        (typ,) = [a for a in typing.get_args(typ) if a is not type(None)]
        origin = typing.get_origin(typ)
    if typ is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin in (list, tuple):
        (item,) = set(typing.get_args(typ)) - {Ellipsis}
        kwargs.update(type=item, **({"action": "append"} if f.metadata.get("repeat") else {"nargs": "+"}))
    elif typ in (str, int, float):
        kwargs["type"] = typ
    else:
        raise TypeError(f"{cls.__name__}.{f.name}: a flag cannot carry a {typ}")
    if "choices" in f.metadata:
        kwargs["choices"] = f.metadata["choices"]
    if "metavar" in f.metadata:
        kwargs["metavar"] = f.metadata["metavar"]
    return kwargs


def dataclass_from_flags(cls: type[T], args: argparse.Namespace) -> T:
    """Defaults < --config YAML < flags; unknown YAML keys, wrong types and values outside `choices` are
    rejected, naming the key and whether the YAML file or the command line set it."""
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return load_config(cls, getattr(args, "config_file", None), flags=flags)
