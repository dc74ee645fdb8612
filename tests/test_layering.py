"""The package layering of DESIGN.md §3: imports only point down, and `trime --help` needs no torch."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

from cli_runner import REPO

# Lower number = lower layer. A module may import its own package and strictly lower layers only.
LAYERS = {
    "trime_dist.core": 0,
    "trime_dist.model": 1, "trime_dist.objective": 1, "data_pipeline": 1, "launcher": 1, "trime_dist.report": 1,
    "trime_dist.train": 2,
    "trime_dist.datastore": 3,
    "trime_dist.eval": 4,
    "trime_dist.cli": 5, "trime_dist.demo": 5,
}


def _package(module: str) -> str | None:
    """The LAYERS key a dotted module name belongs to (longest prefix), or None for third-party code."""
    best = None
    for key in LAYERS:
        if (module == key or module.startswith(key + ".")) and (best is None or len(key) > len(best)):
            best = key
    return best


def _imports(path: str, module: str) -> list[tuple[int, str]]:
    """(line, imported module) of every import in the file, relative imports resolved."""
    tree = ast.parse(open(path).read(), path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[:-node.level]
                base = ".".join(parent + ([base] if base else []))
            # `from pkg import sub` may import a sub-module: judge it by its full name
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def _modules():
    for top in ("trime_dist", "data_pipeline", "launcher"):
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                    yield path, rel.removesuffix(".__init__")


def test_every_module_has_a_layer():
    missing = [m for _, m in _modules() if _package(m) is None and m not in ("trime_dist",)]
    assert not missing, f"modules outside LAYERS: {missing}"


def test_imports_only_point_down():
    upward = []
    for path, module in _modules():
        own = _package(module)
        if own is None:
            continue
        for line, target in _imports(path, module):
            other = _package(target)
            if other is None or other == own:
                continue
            if LAYERS[other] >= LAYERS[own]:
                upward.append(f"{os.path.relpath(path, REPO)}:{line} ({own}) imports {target} ({other})")
    assert not upward, "imports that do not point down:\n" + "\n".join(upward)


def test_help_does_not_import_torch():
    code = ("import sys\nfrom trime_dist.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'deepspeed', 'faiss', 'mpi4py') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "STAGE" in out.stdout and "HEAVY []" in out.stdout, out.stdout[-2000:]
