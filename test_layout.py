"""The layout: each file imports only files of lower layers (no cycles, no arrow upwards), and states
what it is in its docstring. The layers, lowest first, as the README's reading order has them."""
import ast

import pytest

from conftest import ROOT

LAYERS = [{"model"}, {"lora", "generate", "hf"}, {"data"}, {"builtin"}, {"pretrain", "fed"}, {"feddpa"}, {"evaluation"},
          {"runs", "export"}, {"train", "bench_infer", "plot", "fetch"},
          {"bench", "flower_app", "flower_run"}]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def project_imports(path) -> set:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found & set(LAYER)


@pytest.mark.parametrize("name", sorted(LAYER))
def test_imports_go_down_the_layers_only(name):
    path = ROOT / f"{name}.py"
    for imported in project_imports(path):
        assert LAYER[imported] < LAYER[name], f"{name}.py imports {imported}.py, which is not below it"
    assert ast.get_docstring(ast.parse(path.read_text())), f"{name}.py has no docstring"


def test_only_the_flower_files_import_flwr():
    """Flower is an optional extra: python train.py and everything below it run without it."""
    for path in ROOT.glob("*.py"):
        imports = {n.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                   for n in ([a.name for a in node.names] if isinstance(node, ast.Import) else
                             [node.module or ""] if isinstance(node, ast.ImportFrom) else [])}
        if path.stem not in ("flower_app", "test_flower"):
            assert "flwr" not in imports, f"{path.name} imports flwr"


def test_every_library_file_is_in_a_layer():
    files = {p.stem for p in ROOT.glob("*.py") if not p.stem.startswith("test_") and p.stem != "conftest"}
    assert files == set(LAYER)


def test_the_package_installs_every_library_module():
    import tomllib
    with open(ROOT / "pyproject.toml", "rb") as f:
        modules = set(tomllib.load(f)["tool"]["setuptools"]["py-modules"])
    assert modules == set(LAYER) - {"bench", "bench_infer"}
