"""Layer (b): the package's layering, checked from the outside.

`algorithm/` is pure torch, the runtime imports nothing from `adapters/`, adapters load lazily, and tools reach the
runtime only through the public API.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "catprune"


def _modules_after(statement: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return set(out.stdout.split())


def test_import_catprune_imports_no_diffusers_transformer():
    modules = _modules_after("import catprune")
    assert "catprune.api" in modules
    assert not [m for m in modules if m.startswith("diffusers.models.transformers")]
    assert not [m for m in modules if m.startswith("catprune.adapters.") and m != "catprune.adapters.ops"]


def test_import_catprune_algorithm_imports_no_diffusers_at_all():
    modules = _modules_after("import catprune.algorithm")
    assert "catprune.algorithm.selection" in modules
    assert not [m for m in modules if m == "diffusers" or m.startswith("diffusers.")]


def test_adapter_module_is_imported_on_first_matching_model():
    modules = _modules_after(
        "import catprune\nfrom catprune.models.testing import tiny_pixart_transformer\n"
        "catprune.apply(tiny_pixart_transformer())"
    )
    assert "catprune.adapters.pixart" in modules
    assert "catprune.adapters.sd3" not in modules and "catprune.adapters.flux" not in modules


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("package", ["algorithm", "kernels", "runtime"])
def test_lower_layers_import_nothing_above_them(package):
    above = ("adapters", "api", "cli", "bench", "evaluation", "models")
    for path in (SRC / package).glob("*.py"):
        for name in _imports(path):
            parts = name.lstrip(".").split(".")
            assert parts[0] != "diffusers", f"{path.name} imports {name}"
            if name.startswith("..") or name.startswith("catprune."):
                top = parts[1] if name.startswith("catprune.") else parts[0]
                assert top not in above, f"{package}/{path.name} imports {name}"


# private ways into the runtime that tools must not use: the wrapper's marker and the runtime's internals
PRIVATE = ("__catprune_runtime__", "_select_next", "_score_view", "_cluster_and_select", ".fuse = ", "uniforms")


def test_tools_use_only_the_public_api():
    """bench, evaluation, scripts, tests and the rest of src reach the runtime only through catprune's public
    functions."""
    allowed = {SRC / "api.py"} | set((SRC / "runtime").rglob("*.py")) | set((SRC / "algorithm").rglob("*.py"))
    files = [*SRC.rglob("*.py"), *(ROOT / "scripts").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]
    offenders = []
    for path in files:
        if path in allowed or path == Path(__file__).resolve():
            continue
        text = path.read_text()
        offenders += [f"{path.relative_to(ROOT)}: {word}" for word in PRIVATE if word in text]
    assert offenders == []


# functions allowed over 80 lines, with the reason
LONG_FUNCTIONS = {
    "models/shapes/pipeline.py:__call__": "a diffusers pipeline's __call__, kept in the stock pipelines' one-read order",
}


def test_size_limits():
    """No file in src/ over 500 lines; no function over 80 lines except LONG_FUNCTIONS."""
    too_long = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        text = path.read_text()
        if text.count("\n") > 500:
            too_long.append(f"{rel}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80 and f"{rel}:{node.name}" not in LONG_FUNCTIONS:
                    too_long.append(f"{rel}:{node.name}: {length} lines")
    assert too_long == []
