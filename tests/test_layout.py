"""The layout: the method's files at the root, extras, tests and tools in their folders; each file
imports only files of lower layers (no cycles, no arrow upwards), the core none of the extras, and
states what it is in its docstring. The layers, lowest first, as the README's reading order has them."""
import ast
import re
import tomllib

import pytest

from conftest import ROOT

# the root's library files (the core: python train.py needs exactly these), then the extras
CORE = [{"model"}, {"lora", "hf"}, {"fast"}, {"generate"}, {"data"}, {"builtin"}, {"pretrain", "fed"}, {"feddpa"}, {"evaluation"},
        {"runs"}, {"train"}]
EXTRAS = [{"extras.export", "extras.bench_infer", "extras.plot", "extras.fetch", "extras.table"},
          {"extras.bench", "extras.flower_app", "extras.flower_run", "extras.diagnose"}]
LAYER = {name: i for i, names in enumerate(CORE + EXTRAS) for name in names}


def path_of(name: str):
    return ROOT / (name.replace(".", "/") + ".py")


def project_imports(path) -> set:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names} | {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module.split(".")[0]} | {f"{node.module}.{a.name}" for a in node.names}
    return found & set(LAYER)


@pytest.mark.parametrize("name", sorted(LAYER))
def test_imports_go_down_the_layers_only(name):
    path = path_of(name)
    for imported in project_imports(path):
        assert LAYER[imported] < LAYER[name], f"{path.name} imports {imported}, which is not below it"
    assert ast.get_docstring(ast.parse(path.read_text())), f"{path.name} has no docstring"


def test_the_core_imports_no_extra():
    for names in CORE:
        for name in names:
            assert not {m for m in project_imports(path_of(name)) if m.startswith("extras")}, name


def test_only_the_flower_files_import_flwr():
    """Flower is an optional extra: python train.py and everything below it run without it."""
    for path in [*ROOT.glob("*.py"), *ROOT.glob("extras/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("tools/*.py")]:
        imports = {n.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                   for n in ([a.name for a in node.names] if isinstance(node, ast.Import) else
                             [node.module or ""] if isinstance(node, ast.ImportFrom) else [])}
        if path.stem not in ("flower_app", "test_flower"):
            assert "flwr" not in imports, f"{path.name} imports flwr"


def test_every_library_file_is_in_a_layer_and_the_root_is_short():
    root = {p.stem for p in ROOT.glob("*.py") if not p.stem.startswith("test_") and p.stem != "conftest"}
    extras = {f"extras.{p.stem}" for p in ROOT.glob("extras/*.py") if p.stem != "__init__"}
    assert root | extras == set(LAYER)
    assert {p.name for p in ROOT.glob("test_*.py")} == {"test_feddpa.py"}  # the other tests live in tests/
    assert len(list(ROOT.glob("*.py"))) <= 8 + 8  # the design card's files, conftest.py and at most ~8 others


def test_the_package_installs_every_library_module():
    with open(ROOT / "pyproject.toml", "rb") as f:
        setup = tomllib.load(f)["tool"]["setuptools"]
    assert set(setup["py-modules"]) == {n for names in CORE for n in names}
    assert setup["packages"] == ["extras"]


def test_the_reference_is_plain_pytorch_and_the_model_short():
    """Only the optional speed layer (fast.py) calls torch's private API (torch.ops, torch._*); the model
    stays a plain Llama of about 300 lines, as the design card asks."""
    for path in ROOT.glob("*.py"):
        if path.name != "fast.py":
            assert not re.search(r"torch\.ops\.|torch\._[A-Za-z]", path.read_text()), f"{path.name} calls private torch"
    assert len((ROOT / "model.py").read_text().splitlines()) <= 320


@pytest.mark.parametrize("name", ["feddpa", "fed", "evaluation", "lora"])
def test_the_method_s_functions_take_few_parameters(name):
    """Every function of the method's files takes at most 7 parameters, at most 3 of them positional (the
    rest keyword-only): what a call passes is named at the call."""
    for node in ast.walk(ast.parse(path_of(name).read_text())):
        if isinstance(node, ast.FunctionDef):
            positional = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "fn")]
            n = len(positional) + len(node.args.kwonlyargs)
            assert n <= 7 and len(positional) <= 3, f"{name}.py: {node.name} takes {n}, {len(positional)} positional"
