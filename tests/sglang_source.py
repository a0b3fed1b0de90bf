"""SGLang's own source, obtained without installing it (or its CUDA dependencies), read with `ast`, never imported.

`source(version)` returns the extracted `sglang/` directory of the pinned wheel, cached under
~/.cache/dapo-rl/sglang/<version> (`pip download --no-deps sglang==<version>` the first time; only the few source
files the contract tests read are extracted). Where the wheel cannot be obtained (no registry), the calling test is
skipped, naming why. The readers below pull facts out of that source: routes with their methods, auth levels and
request classes (http_server.py), request-class fields (io_struct.py, inheritance within the file included),
ServerArgs command-line flags (0.5.5 server_args.py add_argument calls; 0.5.23 arg_groups/fields dataclasses,
`--` + field name with dashes plus `aliases`), and every string constant of a file (implicitly concatenated
literals are one constant in the AST, so a message split over lines compares whole).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from functools import cache
from pathlib import Path

import pytest

CACHE = Path.home() / ".cache" / "dapo-rl" / "sglang"
FILES = (
    "sglang/version.py",
    "sglang/srt/entrypoints/http_server.py",
    "sglang/srt/managers/io_struct.py",
    "sglang/srt/server_args.py",
    "sglang/srt/sampling/sampling_params.py",
    "sglang/srt/managers/scheduler_components/weight_updater.py",
    "sglang/srt/managers/scheduler_components/flush_wrapper.py",
    "sglang/srt/managers/tokenizer_manager.py",
    "sglang/srt/utils/auth.py",
    "sglang/api/v1/api_types.py",
    "sglang/srt/state_capturer/base.py",
    "sglang/srt/state_capturer/routed_experts.py",
    "sglang/srt/managers/scheduler_components/batch_result_processor.py",
)
FIELD_DIR = "sglang/srt/arg_groups/fields/"


@cache
def source(version: str) -> Path:
    root = CACHE / version
    src = root / "src"
    marker = src / ".extracted"  # the FILES list of the last extraction: a longer list extracts again
    if (src / "sglang").is_dir() and marker.is_file() and marker.read_text() == "\n".join(FILES):
        return src / "sglang"
    wheels = sorted(root.glob("sglang-*.whl"))
    if not wheels:
        root.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"sglang=={version}", "-d", str(root)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"cannot obtain sglang=={version} source ({type(e).__name__}: {e})")
        wheels = sorted(root.glob("sglang-*.whl"))
        if proc.returncode or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
            pytest.skip(
                f"cannot obtain sglang=={version} source (pip download: {tail[0]}; is a package registry reachable?)"
            )
    with zipfile.ZipFile(wheels[0]) as zf:
        for name in zf.namelist():
            if name in FILES or (name.startswith(FIELD_DIR) and name.endswith(".py")):
                zf.extract(name, src)
    marker.write_text("\n".join(FILES))
    return src / "sglang"


@cache
def tree(version: str, rel: str) -> ast.Module:
    path = source(version) / rel
    return ast.parse(path.read_text())


def has(version: str, rel: str) -> bool:
    return (source(version) / rel).is_file()


def strings(version: str, rel: str) -> set[str]:
    return {n.value for n in ast.walk(tree(version, rel)) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def _func(version: str, rel: str, name: str) -> ast.AsyncFunctionDef | ast.FunctionDef:
    for node in ast.walk(tree(version, rel)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            return node
    raise LookupError(f"sglang {version} {rel}: no function {name}")


def function_args(version: str, rel: str, name: str) -> list[str]:
    return [a.arg for a in _func(version, rel, name).args.args]


def function_strings(version: str, rel: str, name: str) -> set[str]:
    fn = _func(version, rel, name)
    return {n.value for n in ast.walk(fn) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def function_source(version: str, rel: str, name: str) -> str:
    return ast.unparse(_func(version, rel, name))


HTTP = "srt/entrypoints/http_server.py"
IO_STRUCT = "srt/managers/io_struct.py"


@cache
def routes(version: str) -> dict[str, dict]:
    """path -> {"methods": set, "auth": str | None, "request": class name | None, "handler": function name}."""
    out: dict[str, dict] = {}
    for node in tree(version, HTTP).body:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        paths, methods, auth = [], set(), None
        for dec in node.decorator_list:
            if not isinstance(dec, ast.Call) or not isinstance(dec.func, ast.Attribute):
                continue
            attr = dec.func.attr
            if attr in ("get", "post", "put", "api_route") and dec.args and isinstance(dec.args[0], ast.Constant):
                paths.append(dec.args[0].value)
                if attr == "api_route":
                    for kw in dec.keywords:
                        if kw.arg == "methods":
                            methods |= {e.value for e in kw.value.elts}
                else:
                    methods.add(attr.upper())
        for dec in node.decorator_list:
            if isinstance(dec, ast.Call) and getattr(dec.func, "id", "") == "auth_level":
                auth = ast.unparse(dec.args[0]).split(".")[-1]
        req = None
        if node.args.args and node.args.args[0].annotation is not None:
            ann = node.args.args[0].annotation
            if isinstance(ann, ast.Subscript) and isinstance(ann.slice, ast.Tuple):  # Annotated[X, Body()]
                ann = ann.slice.elts[0]
            if isinstance(ann, ast.Subscript):  # Optional[X]
                ann = ann.slice
            req = ann.id if isinstance(ann, ast.Name) else None
        for path in paths:
            out[path] = {"methods": methods, "auth": auth, "request": req, "handler": node.name}
    return out


@cache
def _classes(version: str, rel: str) -> dict[str, ast.ClassDef]:
    return {n.name: n for n in tree(version, rel).body if isinstance(n, ast.ClassDef)}


def fields(version: str, cls: str, rel: str = IO_STRUCT) -> list[str]:
    """Annotated fields of `cls` in declaration order, those of its bases in the same file first."""
    classes = _classes(version, rel)
    node = classes[cls]
    out: list[str] = []
    for base in node.bases:
        if isinstance(base, ast.Name) and base.id in classes:
            out += fields(version, base.id, rel)
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if "ClassVar" not in ast.unparse(stmt.annotation):
                out.append(stmt.target.id)
    return out


@cache
def server_flags(version: str) -> frozenset[str]:
    """Every command-line flag of `python -m sglang.launch_server` in this release."""
    flags: set[str] = set()
    field_dir = source(version) / "srt" / "arg_groups" / "fields"
    if field_dir.is_dir():  # 0.5.23: dataclass fields become --field-name (+ aliases)
        for path in sorted(field_dir.glob("*.py")):
            for cls in ast.walk(ast.parse(path.read_text())):
                if not isinstance(cls, ast.ClassDef):
                    continue
                for stmt in cls.body:
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                        flags.add("--" + stmt.target.id.replace("_", "-"))
                        for node in ast.walk(stmt.annotation):
                            if isinstance(node, ast.keyword) and node.arg == "aliases":
                                flags |= {e.value for e in node.value.elts if isinstance(e, ast.Constant)}
    else:  # 0.5.5: parser.add_argument("--flag", "--alias", ...)
        for node in ast.walk(tree(version, "srt/server_args.py")):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
    return frozenset(flags)


def bool_flags_0_5_23(version: str) -> set[str]:
    """Flags of 0.5.23 fields typed bool (store_true switches that take no value)."""
    out = set()
    for path in sorted((source(version) / "srt" / "arg_groups" / "fields").glob("*.py")):
        for cls in ast.walk(ast.parse(path.read_text())):
            if isinstance(cls, ast.ClassDef):
                for stmt in cls.body:
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                        ann = stmt.annotation
                        first = (
                            ann.slice.elts[0]
                            if isinstance(ann, ast.Subscript) and isinstance(ann.slice, ast.Tuple)
                            else ann
                        )
                        if ast.unparse(first) == "bool":
                            out.add("--" + stmt.target.id.replace("_", "-"))
    return out
