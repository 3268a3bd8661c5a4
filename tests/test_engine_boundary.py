"""Only ``futures_hpc/engine.py`` uses what dask, distributed, dask-jobqueue or joblib keep private.

The private names are read from the installed libraries' own source (every ``_name`` they
define or use that is not a dunder), so the check follows the versions under test. In every
other module of the package, this test fails on:

- an import of a private module or name of those libraries;
- ``obj._name`` or ``getattr(obj, "_name")`` where ``_name`` is private in a library and not a
  name futures_hpc itself defines outside subclasses of library classes;
- in a subclass (direct or not) of a library class: ``self._name`` or ``def _name`` with such a
  name (overriding or touching the base class's private state);
- the attributes distributed has without an underscore but does not document
  (:data:`UNDOCUMENTED`).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import textwrap
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "futures_hpc"
BOUNDARY = PACKAGE / "engine.py"
LIBRARIES = ("dask", "distributed", "dask_jobqueue", "joblib")
#: Attributes of distributed without an underscore that its documentation does not promise.
UNDOCUMENTED = frozenset({
    "stream_comms", "client_comms", "batched_stream", "stream_handlers", "allowed_failures",
    "handle_worker_status_change", "periodic_callbacks",
})
#: Public API of namedtuples, which happens to start with an underscore.
NAMEDTUPLE_API = frozenset({"_replace", "_asdict", "_fields", "_make", "_field_defaults"})


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@cache
def library_private_names() -> frozenset[str]:
    """Every non-dunder ``_name`` defined or used in the installed libraries' source."""
    names: set[str] = set()
    for library in LIBRARIES:
        root = Path(importlib.util.find_spec(library).origin).parent
        for path in root.rglob("*.py"):
            try:
                tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
            except SyntaxError:
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    name = node.name
                elif isinstance(node, ast.Attribute):
                    name = node.attr
                elif isinstance(node, ast.Name):
                    name = node.id
                else:
                    continue
                if _private(name):
                    names.add(name)
    return frozenset(names - NAMEDTUPLE_API)


def _modules() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if path != BOUNDARY)


def _library_module(module: str | None) -> bool:
    return bool(module) and module.split(".")[0] in LIBRARIES


def _imported_library_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _library_module(node.module):
            names.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names
                         if _library_module(alias.name))
    return names


@cache
def _parsed() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text()) for path in _modules()}


def _module_namespace(path: Path) -> dict:
    if path.name == "__main__.py":  # runs the command line when imported; defines no class
        return {}
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    name = ".".join(relative.parts).removesuffix(".__init__")
    return vars(importlib.import_module(name))


@cache
def _instance_attributes(cls: type) -> frozenset[str]:
    """``self._name`` a library class assigns in its own source (its private state)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return frozenset()
    return frozenset(
        node.attr for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id == "self" and _private(node.attr)
    )


def inherited_private_names(cls: object) -> frozenset[str]:
    """Private names of the library classes above ``cls`` or its subclasses (methods, state)."""
    if not isinstance(cls, type):
        return frozenset()
    # A mixin of the package is checked against the library classes it is mixed into.
    family, pending = {cls}, [cls]
    while pending:
        for subclass in pending.pop().__subclasses__():
            if subclass not in family:
                family.add(subclass)
                pending.append(subclass)
    ancestors = {ancestor for member in family for ancestor in member.__mro__}
    names: set[str] = set()
    for ancestor in ancestors:
        if ancestor.__module__.split(".")[0] not in LIBRARIES:
            continue
        names.update(name for name in vars(ancestor) if _private(name))
        names.update(_instance_attributes(ancestor))
    return frozenset(names)


@cache
def own_private_names() -> frozenset[str]:
    """``_names`` the package defines itself, in functions and classes not from a library."""
    own: set[str] = set()
    for path, tree in _parsed().items():
        namespace = _module_namespace(path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                if inherited_private_names(namespace.get(node.name)):
                    continue
                for item in ast.walk(node):
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                        own.add(item.name)
                    elif (isinstance(item, ast.Attribute) and isinstance(item.ctx, ast.Store)
                          and isinstance(item.value, ast.Name) and item.value.id == "self"):
                        own.add(item.attr)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.col_offset == 0:
                own.add(node.name)
    return frozenset(name for name in own if _private(name))


def _is_self(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id in ("self", "cls")


def _is_super_call(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "super")


def private_uses(path: Path, tree: ast.Module, namespace: dict) -> list[str]:
    """The uses of library-private names in one module, as ``file:line: what``.

    ``namespace`` holds the module's classes, to find what their library ancestors keep private.
    """
    library = library_private_names()
    own = own_private_names()
    where = path.relative_to(PACKAGE.parent)
    found: list[str] = []

    def report(node: ast.AST, what: str) -> None:
        found.append(f"{where}:{node.lineno}: {what}")

    def visit(node: ast.AST, inherited: frozenset[str]) -> None:
        if isinstance(node, ast.ClassDef):
            inherited = inherited_private_names(namespace.get(node.name))
        if isinstance(node, ast.ImportFrom) and _library_module(node.module):
            hidden = [part for part in node.module.split(".") if _private(part)]
            hidden += [alias.name for alias in node.names if _private(alias.name)]
            if hidden:
                report(node, f"from {node.module} import {', '.join(hidden)}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _library_module(alias.name) and any(
                        _private(part) for part in alias.name.split(".")):
                    report(node, f"import {alias.name}")
        elif isinstance(node, ast.Attribute):
            name = node.attr
            if name in UNDOCUMENTED:
                report(node, f".{name} (undocumented)")
            elif _is_self(node.value) or _is_super_call(node.value):
                if name in inherited:
                    report(node, f"self.{name}, private to a library base class")
            elif name in library and name not in own:
                report(node, f".{name}")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if node.name in inherited:
                report(node, f"def {node.name}, private to a library base class")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str)):
            name = node.args[1].value
            if name in UNDOCUMENTED or (name in library and name not in own):
                report(node, f"{node.func.id}(..., {name!r})")
        for child in ast.iter_child_nodes(node):
            visit(child, inherited)

    visit(tree, frozenset())
    return found


def test_library_private_names_are_found():
    """The scan sees dask's private names (else the test below would pass on nothing)."""
    names = library_private_names()
    assert {"_correct_state", "_stream_handlers", "_set_global_client"} <= names
    assert len(names) > 1000


def test_the_scan_catches_a_private_use():
    source = (
        "from distributed.client import _set_global_client\n"
        "from distributed.deploy import SpecCluster\n"
        "class C(SpecCluster):\n"
        "    async def _correct_state_internal(self):\n"
        "        self._lock\n"
        "        self._our_own_state = 1\n"
        "def f(client, scheduler):\n"
        "    client._stream_handlers\n"
        "    getattr(client, '_state')\n"
        "    scheduler.stream_comms\n"
    )
    namespace: dict = {}
    exec(compile(source, "example.py", "exec"), namespace)  # noqa: S102 - defines C only
    found = private_uses(PACKAGE / "example.py", ast.parse(source), namespace)
    assert len(found) == 6, found


@pytest.mark.parametrize("path", _modules(), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_no_private_name_of_a_library_outside_the_engine_boundary(path):
    uses = private_uses(path, _parsed()[path], _module_namespace(path))
    assert not uses, (
        "private names of dask/distributed/dask-jobqueue/joblib outside futures_hpc/engine.py "
        "(move each use there, saying what it relies on):\n" + "\n".join(uses)
    )
