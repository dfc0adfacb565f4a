"""server/layers is the bottom of the server package: adapters/ and engine/ build on it, so none of its modules may
import them (nor any other server package), not even for type hints. Checked on the source, every import
statement wherever it sits (module level, inside functions, under ``if TYPE_CHECKING:``), plus any string that
names another server package (importlib)."""
from __future__ import annotations

import ast
from pathlib import Path

import server.layers

LAYERS = Path(server.layers.__file__).parent


def foreign_imports(source: str) -> list[str]:
    """The modules outside server.layers that ``source`` (a module of server/layers) imports or names."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level >= 2:  # from .. import x / from ..adapters import y: out of the package
                found.append("." * node.level + (node.module or ""))
                continue
            names = [] if node.level else [node.module or ""]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value] if node.value.startswith("server.") else []
        else:
            continue
        found += [n for n in names if (n == "server" or n.startswith("server."))
                  and n != "server.layers" and not n.startswith("server.layers.")]
    return found


def test_the_checker_sees_every_kind_of_import():
    source = ("import torch\nfrom server.layers.ops import scale_rows\nfrom . import kernels\n"
              "from typing import TYPE_CHECKING\n"
              "if TYPE_CHECKING:\n    from server.adapters.weights import AdapterWeights\n"
              "def f():\n    import server.engine.runner\n    from ..api import app\n"
              "    return importlib.import_module('server.adapters.manager')\n")
    assert foreign_imports(source) == ["server.adapters.weights", "server.engine.runner", "..api",
                                       "server.adapters.manager"]


def test_layers_import_only_layers():
    modules = sorted(LAYERS.glob("*.py"))
    assert len(modules) > 5, LAYERS
    bad = {path.name: found for path in modules if (found := foreign_imports(path.read_text()))}
    assert not bad, f"server/layers must not import other server packages: {bad}"
