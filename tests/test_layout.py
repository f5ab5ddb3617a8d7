"""The layout the design card fixes: models/ is the method and imports only torch, numpy, gymnasium (and itself)."""

import ast
import os

from conftest import ROOT

ALLOWED = {"torch", "numpy", "gymnasium", "models", "__future__", "copy", "dataclasses", "math", "typing"}


def imported_roots(path: str) -> set[str]:
    tree = ast.parse(open(path).read(), path)
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_models_import_nothing_from_utils():
    folder = os.path.join(ROOT, "models")
    found = {name: imported_roots(os.path.join(folder, name)) for name in os.listdir(folder) if name.endswith(".py")}
    assert "agent.py" in found and "dream.py" in found  # the agent and the dream live in models/
    offending = {name: sorted(roots - ALLOWED) for name, roots in found.items() if roots - ALLOWED}
    assert not offending, f"models/ may import only {sorted(ALLOWED)}: {offending}"


def test_the_check_sees_a_utils_import(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("import numpy as np\nfrom utils.io import save_npz\n")
    assert imported_roots(str(path)) - ALLOWED == {"utils"}
