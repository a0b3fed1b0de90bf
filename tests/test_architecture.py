"""The import rules of docs/DESIGN.md ("Packages and their dependency rules"), read from the sources with ast.

Every import counts, function-level ones included. A module is a .py file under pipeline/ or engines/;
`from pkg import name` is an arrow to `pkg.name` when that is a module, else to `pkg` (its __init__).
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The pipeline modules that may name concrete engines and backends: the runtime's composition root, and `dapo plan`'s
# GPU check, a user tool that builds the backends to measure them.
COMPOSITION_ROOTS = {"pipeline.runtime.wiring", "pipeline.planning.gpu_check"}
# What engines/ may import of pipeline/: the contracts (the config schema among them), nothing else.
ENGINE_VISIBLE = ("pipeline.contracts",)
# The test support: tiny models, megatron and MoE harnesses, rollout simulator. Tests and benchmarks import it; product
# never.
TEST_SUPPORT = "pipeline.testing"


def module_files() -> dict[str, Path]:
    mods = {}
    for top in ("pipeline", "engines"):
        for path in (ROOT / top).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = path
    return mods


def imports_of(path: Path, name: str, mods: dict[str, Path]) -> set[str]:
    """The project modules `path` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
    return {m for m in out if m in mods}


def graph() -> dict[str, set[str]]:
    mods = module_files()
    return {name: imports_of(path, name, mods) - {name} for name, path in mods.items()}


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_the_scan_sees_function_level_and_package_imports():
    g = graph()
    assert "engines.client" in g["pipeline.runtime.wiring"]  # imported inside a function only
    assert "pipeline.contracts.records" in g["pipeline.flow.buffer"]
    assert len(g) > 50


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(g[m]):
            if d not in g:
                continue
            if state.get(d) == 1:
                cycle = path[path.index(d) :] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_engines_import_only_the_contracts_of_pipeline():
    bad = [
        f"{m} -> {d}"
        for m, deps in graph().items()
        if within(m, "engines")
        for d in deps
        if within(d, "pipeline") and not any(within(d, v) for v in ENGINE_VISIBLE)
    ]
    assert not bad, bad


def test_pipeline_reaches_engines_only_at_the_composition_roots():
    """The test support (pipeline/testing) composes engines as the tests do; no product module imports it (below), so
    it opens no path from the product to the engines."""
    g = graph()
    reaching = {
        m
        for m, deps in g.items()
        if within(m, "pipeline") and not within(m, TEST_SUPPORT) and any(within(d, "engines") for d in deps)
    }
    assert reaching <= COMPOSITION_ROOTS, sorted(reaching - COMPOSITION_ROOTS)
    assert len(COMPOSITION_ROOTS) <= 3


def test_low_levels_do_not_import_high_levels():
    """contracts import only contracts; config only the contracts; the algorithm, the flow and the
    runtime only what lies below them (the flow may use the tokenizer, a leaf; the runtime never the tools)."""
    allowed = {
        "pipeline.contracts": ("pipeline.contracts",),
        "pipeline.config": ("pipeline.contracts.config",),
        "pipeline.algorithm": ("pipeline.algorithm", "pipeline.contracts", "pipeline.config"),
        "pipeline.runtime": (
            "pipeline.runtime",
            "pipeline.flow",
            "pipeline.algorithm",
            "pipeline.contracts",
            "pipeline.config",
            "pipeline.tokenizer",
            "pipeline.modeling",
            "pipeline.warmstart",
            "engines",
        ),
        "pipeline.flow": (
            "pipeline.flow",
            "pipeline.algorithm",
            "pipeline.contracts",
            "pipeline.config",
            "pipeline.tokenizer",
        ),
    }
    bad = []
    for m, deps in graph().items():
        for low, ok in allowed.items():
            if within(m, low):
                bad += [f"{m} -> {d}" for d in deps if not any(within(d, o) for o in ok)]
    assert not bad, bad


def test_product_code_never_imports_test_support():
    g = graph()
    bad = [
        f"{m} -> {d}" for m, deps in g.items() if not within(m, TEST_SUPPORT) for d in deps if within(d, TEST_SUPPORT)
    ]
    assert not bad, bad
    # Test harness lives in the test-support package only, not as a `testing` module inside a product package.
    stray = [m for m in g if not within(m, TEST_SUPPORT) and m.rpartition(".")[2] in ("testing", "test_utils")]
    assert not stray, stray
    assert {"pipeline.testing.megatron", "pipeline.testing.tiny_models"} <= set(g)


# Directories that hold no project source: virtual environments, caches, build outputs (and hidden ones, .venv, .git).
NOT_SOURCE = {"build", "dist", "venv", "node_modules", "__pycache__", "site-packages"}


def imports_of_tests(path: Path, root: Path = ROOT) -> list[str]:
    """The imports of the top-level `tests` package in `path` (relative ones resolved;
    `importlib.import_module("tests...")` and `__import__("tests...")` with a literal name count too)."""
    package = path.relative_to(root).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            anchor = list(package[: max(len(package) - node.level + 1, 0)]) if node.level else []
            names = [".".join(anchor + ([node.module] if node.module else []))]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found += [f"{path.relative_to(root)}:{node.lineno} imports {n}" for n in names if within(n, "tests")]
    return found


def source_files_outside_tests(root: Path = ROOT) -> list[Path]:
    """Every .py file of the checkout but those under the top-level tests/ (pruned walk: a .venv inside the checkout
    is never read)."""
    out = []
    for here, dirs, files in os.walk(root):
        dirs[:] = [
            d for d in dirs if not (d.startswith(".") or d in NOT_SOURCE or (Path(here) == root and d == "tests"))
        ]
        out += [Path(here) / f for f in files if f.endswith(".py")]
    return out


def test_nothing_outside_tests_imports_the_test_suite():
    """Benchmarks, scripts and product code share helpers through pipeline/testing, never by importing tests/ (which
    is not installed with the package, and whose modules run pytest fixtures and module-level set-up on import)."""
    files = source_files_outside_tests()
    assert {"benchmarks", "pipeline", "engines"} <= {p.relative_to(ROOT).parts[0] for p in files}
    bad = [hit for path in files for hit in imports_of_tests(path)]
    assert not bad, bad


def test_the_tests_import_scan_sees_every_form(tmp_path):
    """The scan above catches absolute, from-, relative and importlib imports of tests, and nothing else."""
    (tmp_path / "benchmarks").mkdir()
    src = tmp_path / "benchmarks" / "bench_x.py"
    src.write_text(
        "import tests.test_a\nfrom tests import test_b\nfrom ..tests.test_c import f\n"
        "import importlib\nm = importlib.import_module('tests.test_d')\n"
        "import testsuite\nfrom pipeline import tests_like\nfrom . import tests\n"
    )
    hits = imports_of_tests(src, tmp_path)
    assert [h.split(" imports ")[1] for h in hits] == ["tests.test_a", "tests", "tests.test_c", "tests.test_d"], hits
