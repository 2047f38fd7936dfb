"""core/ decides and never does I/O: it may import only the stdlib, attrs, itself and
prometheus-client's text parser (a pure function from text to metric families)."""

import ast
import pathlib
import sys

import ntonix.core

CORE = pathlib.Path(ntonix.core.__file__).parent
ALLOWED_THIRD_PARTY = {"attrs", "ntonix", "prometheus_client"}


def _imported_roots(path: pathlib.Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_core_imports_only_stdlib_and_attrs() -> None:
    offenders = {}
    for path in CORE.glob("*.py"):
        foreign = _imported_roots(path) - sys.stdlib_module_names - ALLOWED_THIRD_PARTY
        if foreign:
            offenders[path.name] = sorted(foreign)
    assert not offenders


def test_core_takes_only_the_parser_from_prometheus_client() -> None:
    for path in CORE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prometheus"):
                assert node.module == "prometheus_client.parser", path
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("prometheus") for a in node.names), path


def test_core_never_awaits() -> None:
    for path in CORE.glob("*.py"):
        tree = ast.parse(path.read_text())
        assert not any(isinstance(n, ast.AsyncFunctionDef | ast.Await) for n in ast.walk(tree)), (
            path
        )


def test_core_uses_only_pure_gateway_modules() -> None:
    # ntonix.errors is pure; anything else under ntonix would bring I/O in.
    for path in CORE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("ntonix")
            ):
                assert node.module.startswith(("ntonix.core", "ntonix.errors")), path
