"""The repository's structural rules, checked by reading the source (nothing is imported or written):

- every import between packages follows one table of allowed edges (static imports anywhere in a file, and
  module names given as strings, e.g. to `importlib.import_module`);
- no import circle between files of ips/ and data_prep/;
- no function takes more than 8 parameters; tools/ stays small; scripts import neither tests nor each other
  and leave `sys.path` alone; code does not point at design notes outside the repository or at issue numbers.

docs/ARCHITECTURE.md explains the layers this table encodes.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("ips", "data_prep")
SCRIPTS = ("benchmarks", "experiments", "tools")

# Allowed imports between units (a unit: `ips.<subpackage or module>`, the root facade `ips`, or
# `data_prep`); a unit may always import itself. Lower layers first: a unit lists only units above it in
# this table. `ips` (the root) is the lazy public API and may name anything; data_prep reads only
# `ips.__version__` from it. `ips._version` holds the version alone, for the store contract's marker.
_BASE = {"ips.errors", "ips.format", "ips.config", "ips.foundation"}
ALLOWED: dict[str, set[str]] = {
    "ips.errors": set(),
    "ips._version": set(),
    "ips.format": {"ips._version", "ips.errors"},
    "ips.config": {"ips.errors"},
    "ips.foundation": {"ips.errors"},  # the foundation encoders' catalog: data only, read by prep and model
    "ips.runtime": {"ips.errors", "ips.config"},
    "data_prep": {"ips", "ips.errors", "ips.format", "ips.foundation"},
    "ips.data": _BASE,
    "ips.model": {"ips.errors", "ips.config", "ips.foundation"},
    "ips.algo": _BASE | {"ips.data", "ips.model"},
    "ips.infer": _BASE | {"ips.runtime", "ips.data", "ips.model", "ips.algo"},
    "ips.training": _BASE | {"ips.runtime", "ips.data", "ips.model", "ips.algo", "ips.infer"},
    "ips.pretrain": _BASE | {"ips.runtime", "ips.data", "ips.model", "ips.algo", "ips.infer", "ips.training"},
    "ips.synthetic": _BASE | {"ips.data", "data_prep"},
    "ips.eval": _BASE | {"ips.data", "ips.model", "ips.synthetic"},
    "ips.view": _BASE | {"ips.data", "ips.model", "ips.infer"},
    "ips.bench": _BASE
    | {"ips.runtime", "ips.data", "ips.model", "ips.algo", "ips.infer", "ips.training", "ips.pretrain"}
    | {"ips.synthetic", "ips.eval", "data_prep"},
    "ips.demo": _BASE
    | {"ips.runtime", "ips.data", "ips.model", "ips.algo", "ips.infer", "ips.training", "ips.synthetic"}
    | {"ips.eval"},
}
EVERY_UNIT = {"ips", *ALLOWED, "ips.cli", "ips.__main__"}
ALLOWED["ips.cli"] = EVERY_UNIT - {"ips.cli"}  # the CLI parses arguments and may call any layer
ALLOWED["ips"] = EVERY_UNIT - {"ips"}
ALLOWED["ips.__main__"] = {"ips.cli"}  # `python -m ips`: the command line, nothing else

# Known import circles: none (the test below fails, saying so, when an entry here is no longer a circle).
KNOWN_CIRCLES: list[set[str]] = []

MAX_PARAMETERS = 8
# Functions allowed over the limit (none: state travels as one object).
KNOWN_LONG_SIGNATURES: set[str] = set()

MAX_TOOLS = 8

# Code files allowed to point at design notes that are not in the repository (docs/ARCHITECTURE.md is),
# or at issue numbers (none).
NOTE_NAMES = re.compile("(DESIGN|STYLE)" + r"\.md")
ISSUE_NUMBER = re.compile(r"\b[Ii]ssue" + r" \d")
KNOWN_NOTE_MENTIONS: set[str] = set()
KNOWN_ISSUE_MENTIONS: set[str] = set()
CODE_SUFFIXES = {".py", ".sh", ".yaml", ".yml", ".toml"}


# -- reading imports -----------------------------------------------------------------------------------


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_modules() -> dict[str, Path]:
    """Every module of ips/ and data_prep/ by dotted name (packages by their own name)."""
    return {module_name(p): p for folder in LIBRARY for p in sorted((ROOT / folder).rglob("*.py"))}


MODULES = library_modules()


def imports_of(source: str, package: str, modules: dict[str, Path] | None = None) -> set[str]:
    """Every module a file's `source` imports, as absolute dotted names (`from x import y` gives `x.y`;
    relative imports resolved against `package`), wherever in the file the import is; plus every string
    constant that is exactly the name of a module in `modules` (names given to `importlib.import_module`,
    or held in a table for it)."""
    modules = MODULES if modules is None else modules
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value:
            if node.value in modules:
                found.add(node.value)
    return found


def file_imports(path: Path) -> set[str]:
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    return imports_of(path.read_text(), package)


def resolve(name: str, modules: dict[str, Path] | None = None) -> str | None:
    """The most specific module of ips/ or data_prep/ that `name` (a module, or a name in one) lies in."""
    modules = MODULES if modules is None else modules
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def unit(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "data_prep":
        return "data_prep"
    return "ips" if len(parts) == 1 else f"ips.{parts[1]}"


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_reader_sees_late_relative_and_string_imports():
    """The checks are only as good as the reader: it must see function-level and relative imports and
    module names in strings (a sample in memory: nothing is written into the source tree)."""
    sample = (
        "import importlib\n"
        "TABLE = {'train': 'ips.training.loop', 'text': 'ips.training.loop is where it lives'}\n"
        "def f():\n"
        "    from ips.training.loop import train\n"
        "    from ..model import checkpoint\n"
        "    return importlib.import_module('ips.infer.slide'), train, checkpoint\n"
    )
    found = imports_of(sample, "ips.algo")
    assert {
        "ips.training.loop.train",
        "ips.model.checkpoint",
        "ips.training.loop",
        "ips.infer.slide",
    } <= found
    assert "ips.training.loop is where it lives" not in found  # prose is not a module name
    assert resolve("ips.training.loop.train") == "ips.training.loop"
    assert unit("ips.training.loop") == "ips.training" and unit("data_prep.writer") == "data_prep"


# -- the layer table -----------------------------------------------------------------------------------


def test_every_package_has_a_row_in_the_table():
    """A new package or top-level module of ips/ must be placed in the layers before it is used."""
    assert {unit(m) for m in MODULES} - set(ALLOWED) == set()


def test_imports_between_packages_follow_the_table():
    bad: dict[str, list[str]] = {}
    for module, path in MODULES.items():
        src = unit(module)
        for name in file_imports(path):
            target = resolve(name)
            if target is None or unit(target) == src:
                continue
            if unit(target) not in ALLOWED[src]:
                bad.setdefault(rel(path), []).append(f"{src} -> {target}")
    assert bad == {}


def test_data_prep_reads_only_the_version_from_the_root_package():
    bad = {
        rel(path): sorted(n for n in file_imports(path) if resolve(n) == "ips" and n != "ips.__version__")
        for module, path in MODULES.items()
        if unit(module) == "data_prep"
    }
    assert {k: v for k, v in bad.items() if v} == {}


# -- circles ---------------------------------------------------------------------------------------------


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        targets = {resolve(n) for n in file_imports(path)}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def test_the_circle_finder_finds_circles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
    assert circles(graph) == [{"a", "b", "c"}]


def test_no_import_circle_between_files():
    found = circles(import_graph())
    new = [sorted(c) for c in found if c not in KNOWN_CIRCLES]
    gone = [sorted(c) for c in KNOWN_CIRCLES if c not in found]
    assert new == [], "import circle(s) between files"
    assert gone == [], "no longer a circle: delete it from KNOWN_CIRCLES"


# -- signatures, tools, scripts, mentions -----------------------------------------------------------------


def counted_parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Positional parameters (with or without defaults, not a leading self/cls) and keyword-only ones
    without a default; *args and **kwargs are not counted."""
    a = node.args
    positional = [p.arg for p in [*a.posonlyargs, *a.args]]
    if positional[:1] in (["self"], ["cls"]):
        positional = positional[1:]
    required_keywords = [p for p, default in zip(a.kwonlyargs, a.kw_defaults, strict=True) if default is None]
    return len(positional) + len(required_keywords)


def test_parameter_count_rule():
    tree = ast.parse(
        "def f(a, b, c, d, e, f, g, h, i=1, *args, j, k=2, **kw): pass\n"
        "class C:\n    def m(self, a, b, c, d, e, f, g, h): pass\n"
    )
    f, _, m = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert counted_parameters(f) == 10 and counted_parameters(m) == 8


def test_no_function_takes_more_than_8_parameters():
    long: set[str] = set()
    for folder in (*LIBRARY, *SCRIPTS):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    if counted_parameters(node) > MAX_PARAMETERS:
                        long.add(f"{rel(path)} {node.name}")
    assert sorted(long - KNOWN_LONG_SIGNATURES) == [], "pass state as one object"
    assert sorted(KNOWN_LONG_SIGNATURES - long) == [], "fixed: delete from KNOWN_LONG_SIGNATURES"


def test_tools_holds_at_most_8_files():
    files = [p for p in (ROOT / "tools").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) <= MAX_TOOLS, sorted(rel(p) for p in files)


def script_files() -> list[Path]:
    return [p for folder in SCRIPTS for p in sorted((ROOT / folder).rglob("*.py"))]


def test_scripts_import_no_test_and_no_other_script_and_leave_sys_path_alone():
    tests = {p.stem for p in (ROOT / "tests").glob("*.py")}
    scripts = {p.stem for p in script_files()}
    bad: dict[str, list[str]] = {}
    for path in script_files():
        source = path.read_text()
        heads = {name.split(".")[0] for name in imports_of(source, "")}
        wrong = sorted((heads & (tests | scripts | {"tests"})) - {path.stem})
        if re.search(r"\bsys\.path\b", source):
            wrong.append("sys.path")
        if wrong:
            bad[rel(path)] = wrong
    assert bad == {}


def test_every_script_imports_only_what_exists():
    """benchmarks/, experiments/ and tools/ are not imported by the suite: a moved module must not break
    them silently."""
    missing = []
    for path in script_files():
        for name in sorted(n for n in imports_of(path.read_text(), "") if n.split(".")[0] in LIBRARY):
            module, _, attr = name.rpartition(".")
            try:
                importlib.import_module(name)
            except ImportError:
                try:
                    if not hasattr(importlib.import_module(module), attr):
                        missing.append(f"{rel(path)}: {name}")
                except ImportError:
                    missing.append(f"{rel(path)}: {name}")
    assert missing == []


def code_files() -> list[Path]:
    skip = {".git", ".venv", "node_modules", "__pycache__"}
    return [
        p
        for p in sorted(ROOT.rglob("*"))
        if p.suffix in CODE_SUFFIXES and p.is_file() and not skip & set(p.relative_to(ROOT).parts)
    ]


@pytest.mark.parametrize(
    ("pattern", "known"), [(NOTE_NAMES, KNOWN_NOTE_MENTIONS), (ISSUE_NUMBER, KNOWN_ISSUE_MENTIONS)]
)
def test_code_names_no_outside_design_note_and_no_issue_number(pattern, known):
    """Code points at docs/ARCHITECTURE.md and docs/BENCHMARKS.md, which are in the repository; an issue
    number means nothing to a reader of the code."""
    found = {rel(p) for p in code_files() if pattern.search(p.read_text(errors="replace"))}
    assert sorted(found - known) == []
    assert sorted(known - found) == [], "fixed: delete from the known list"


def test_tests_that_train_or_measure_memory_are_also_marked_slow():
    """`-m "not slow"` must stay fast: a `learning` or `rss` test carries `slow` too."""

    def marks(node: ast.FunctionDef) -> set[str]:
        found = set()
        for d in node.decorator_list:
            target = d.func if isinstance(d, ast.Call) else d
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Attribute):
                if target.value.attr == "mark":
                    found.add(target.attr)
        return found

    bad = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                m = marks(node)
                if m & {"learning", "rss"} and "slow" not in m:
                    bad.append(f"{rel(path)}::{node.name}")
    assert bad == []


def test_every_benchmark_names_a_section_of_the_results_page():
    """Each harness in benchmarks/ says which results it reproduces, and that section exists."""
    headings = {
        line[3:].strip()
        for line in (ROOT / "docs" / "BENCHMARKS.md").read_text().splitlines()
        if line.startswith("## ")
    }
    bad = {}
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        line = next((x for x in doc.splitlines() if x.startswith("Results page row")), "")
        named = re.findall(r'"([^"]+)"', line)
        if not named or set(named) - headings:
            bad[rel(path)] = named or "no 'Results page row: docs/BENCHMARKS.md, \"SECTION\"' line"
    assert bad == {}
