"""Help text for config dataclasses: every key with its type, default and the comment beside it."""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing


def _field_comments(cls: type) -> dict[str, str]:
    """Map field name -> the `# comment` written after it in the class body."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments = {}
    for line in source.splitlines():
        m = re.match(r"\s+(\w+)\s*:\s*[^#]*#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
    return comments


def config_help(cls: type, prefix: str = "") -> str:
    """One line per leaf key: `  model.n_layers (int, default 2): transformer blocks`."""
    lines = []
    comments = _field_comments(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            lines.append(config_help(typ, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        type_name = getattr(typ, "__name__", str(typ).replace("typing.", ""))
        doc = comments.get(f.name, "")
        lines.append(f"  {prefix}{f.name} ({type_name}, default {default!r})" + (f": {doc}" if doc else ""))
    return "\n".join(lines)
