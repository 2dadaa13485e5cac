"""The package layout's import rules (issue 14), checked by reading every module's imports (also those
inside functions), so that a newcomer can trust the folder names: prep -> store -> loader -> select ->
train / infer, and nothing lower reaches up."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, absolute names (`from . import x` resolved against its package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            # `from ips.x import y` -> `ips.x.y` (y a module or a name in it): what the rules compare
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def files_under(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def offending(folder: str, allowed: callable) -> dict[str, list[str]]:
    bad: dict[str, list[str]] = {}
    for path in files_under(folder):
        wrong = sorted(m for m in imports_of(path) if not allowed(m))
        if wrong:
            bad[str(path.relative_to(ROOT))] = wrong
    return bad


def within(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


@pytest.mark.parametrize("folder", ["ips/infer", "ips/model", "ips/data", "ips/algo", "ips/format"])
def test_lower_layers_do_not_import_training(folder):
    assert offending(folder, lambda m: not within(m, "ips.training")) == {}


def test_model_imports_neither_data_nor_prep():
    assert offending("ips/model", lambda m: not within(m, "ips.data", "data_prep")) == {}


def test_data_prep_imports_only_the_format_and_the_errors_from_ips():
    def allowed(m: str) -> bool:
        return not within(m, "ips") or within(m, "ips.format", "ips.errors") or m == "ips.__version__"

    assert offending("data_prep", allowed) == {}


def test_no_library_module_calls_the_cli():
    library = [f for f in files_under("ips") if "cli" not in f.relative_to(ROOT).parts]
    bad = {
        str(f.relative_to(ROOT)): sorted(m for m in imports_of(f) if within(m, "ips.cli")) for f in library
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_rule_reader_sees_imports_inside_functions():
    """The checks above are only as good as the reader: it must see late (function-level) imports."""
    sample = ROOT / "ips" / "_layout_probe.py"
    sample.write_text("def f():\n    from ips.training.loop import train\n    return train\n")
    try:
        assert "ips.training.loop.train" in imports_of(sample)
    finally:
        sample.unlink()


MAX_FUNCTION_LINES = 80


def code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef, source: list[str]) -> int:
    """Lines of a function that hold code: not blank, not only a comment, not its docstring."""
    skip: set[int] = set()
    first = node.body[0]
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        skip = set(range(first.lineno, first.end_lineno + 1))
    return sum(
        1
        for n in range(node.lineno, node.end_lineno + 1)
        if n not in skip and source[n - 1].strip() and not source[n - 1].strip().startswith("#")
    )


def test_no_function_is_longer_than_about_80_lines():
    long: dict[str, int] = {}
    for folder in ("ips", "data_prep"):
        for path in files_under(folder):
            source = path.read_text().splitlines()
            for node in ast.walk(ast.parse("\n".join(source))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = code_lines(node, source)
                    key = f"{path.relative_to(ROOT)} {node.name}"
                    if n > MAX_FUNCTION_LINES:
                        long[key] = n
    assert long == {}


def test_every_tool_imports_only_what_exists():
    """tools/ are not imported by the suite; a moved module must not break them silently (issue 14 moved
    `data_prep.errors` to `ips.errors` and `tools/make_small_object_dataset.py` failed at its first line)."""
    import importlib

    missing = []
    for path in files_under("tools"):
        for name in sorted(m for m in imports_of(path) if within(m, "ips", "data_prep")):
            module, _, attr = name.rpartition(".")
            try:
                importlib.import_module(name)
            except ImportError:
                try:
                    if not hasattr(importlib.import_module(module), attr):
                        missing.append(f"{path.name}: {name}")
                except ImportError:
                    missing.append(f"{path.name}: {name}")
    assert missing == []
