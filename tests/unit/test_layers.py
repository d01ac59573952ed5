"""Layering of src/dsched: which package may import which, what the pure layers may not
import, and how long a source file may grow.

Every module is parsed with ``ast``, never imported: no event loop, no dask, about a
second. Every import counts, wherever it sits: at the top, inside a function, under
``if TYPE_CHECKING:`` (a type-only import is still a dependency of the module's API), and
``importlib.import_module("literal")``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "dsched"


class Layer(NamedTuple):
    name: str
    pure: bool
    members: tuple[str, ...]  # packages or modules under dsched/ (dotted, without "dsched.")
    about: str


PURE, SHELL = True, False

# The layers of dsched, lowest first. A module may import modules of its own layer and of
# any layer above it in this table (a lower one), never of a layer below it (a higher one).
# A row may hold several packages: they form one layer and may import each other. A module
# belongs to the row of its longest matching member, so ``sim.cli`` (a command line: it
# reads files and prints) sits on the top row while the rest of ``sim`` is a pure layer.
# Every module must have a row: a new package is placed here deliberately. Rows may name
# packages that do not exist (yet). The root package ``dsched`` (``__version__``) is below
# everything: anyone may import it, and it imports nothing of dsched.
# PURE layers do no I/O, read no clock and run no event loop: see FORBIDDEN_IN_PURE.
LAYERS: tuple[Layer, ...] = (
    Layer("wire", PURE, ("wire",), "Dask TCP framing and the message codec"),
    Layer("policy", PURE, ("policy",), "placement policies: policy events in, decisions out"),
    Layer("state", PURE, ("state",), "the task state machine: handle(event, now) -> Outbox"),
    Layer("ext", PURE, ("ext",), "scheduler extensions served by the core"),
    Layer("core", PURE, ("core",), "state machine + policy + extensions, driven as one"),
    Layer("sim", PURE, ("sim",), "discrete-event simulator of a cluster"),
    Layer("graph", SHELL, ("graph",), "update-graph intake with dask's code (in a thread)"),
    Layer("comm", SHELL, ("comm",), "asyncio TCP/TLS comms, listener, connection pool"),
    Layer("server", SHELL, ("server",), "the asyncio reactor around the core"),
    Layer("http", SHELL, ("http",), "HTTP endpoints of the scheduler"),
    Layer("deploy", SHELL, ("deploy",), "starting schedulers and clusters"),
    Layer(
        "top",
        SHELL,
        ("tools", "bench", "testing", "cli", "__main__", "sim.cli"),
        "command lines and tools around the scheduler",
    ),
)

# What a pure layer may not import (a module and its submodules). Comments say why.
FORBIDDEN_IN_PURE: dict[str, str] = {
    **dict.fromkeys(
        ("asyncio", "concurrent", "multiprocessing", "selectors", "select", "signal"),
        "an event loop, threads or processes",
    ),
    **dict.fromkeys(("threading", "_thread"), "threads"),
    **dict.fromkeys(("tornado", "distributed"), "an event loop (distributed brings tornado)"),
    **dict.fromkeys(("socket", "ssl", "socketserver", "http", "urllib"), "the network"),
    **dict.fromkeys(
        ("os", "subprocess", "shutil", "tempfile", "psutil"), "processes, files, environment"
    ),
    "time": "a clock (the caller passes `now`)",
    "random": "global randomness (the caller passes a seed)",
    "uuid": "random ids",
    "logging": "logging (the state machine returns log records in its Outbox)",
}

# Names of forbidden modules that are pure after all, and the layers that may use them. A
# module importing one may use only these names of it: ``random.Random(seed)`` builds a
# seeded generator, while ``random.random()`` would read the global, unseeded one.
ALLOWED_IN_PURE: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # module: (names, layers)
    "random": (frozenset({"Random"}), frozenset({"policy", "sim"})),
    # The codec keeps one reusable encoder per thread (graph intake encodes in a thread).
    "threading": (frozenset({"local"}), frozenset({"wire"})),
    # P2P reuses distributed.shuffle's pure data classes, key helpers and exceptions (the
    # worker tells the exceptions apart by class); importing them starts nothing.
    "distributed.shuffle._core": (
        frozenset(
            {"SchedulerShuffleState", "ShuffleId", "ShuffleSpec", "barrier_key", "id_from_key"}
        ),
        frozenset({"ext"}),
    ),
    "distributed.shuffle._exceptions": (
        frozenset({"P2PConsistencyError", "P2PIllegalStateError"}),
        frozenset({"ext"}),
    ),
}

# Whether imports under `if TYPE_CHECKING:` count. They do: a type-only import of a higher
# layer still puts that layer's types into the lower one's interface. The way out is for the
# lower layer to declare the interface it needs (a Protocol), which the higher one satisfies.
COUNT_TYPE_ONLY_IMPORTS = True

MAX_LINES = 800  # split a module before it grows past this


# ---------------------------------------------------------------------- the parser
@dataclass(frozen=True)
class Import:
    module: str  # absolute dotted name of what is imported (a module, or a name in one)
    names: tuple[str, ...]  # for `from module import a, b`: ("a", "b"); else ()
    line: int
    type_only: bool = False  # under `if TYPE_CHECKING:`


@dataclass(frozen=True)
class Module:
    name: str
    shown: str  # its path, as printed: src/dsched/...
    tree: ast.Module | None  # None: it does not parse (see test_every_module_parses)
    error: str = ""

    @property
    def is_package(self) -> bool:
        return self.shown.endswith("__init__.py")


@dataclass(frozen=True)
class Problem:
    module: Module
    line: int
    target: str  # the imported module (or the forbidden use)
    why: str

    def __str__(self) -> str:
        return f"{self.module.name} ({self.module.shown}:{self.line}) {self.target}: {self.why}"


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def load_modules(src: Path = SRC) -> dict[str, Module]:
    modules = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        name, shown = module_name(path, src), str(path.relative_to(src.parent))
        try:
            modules[name] = Module(name, shown, ast.parse(path.read_text(), shown))
        except SyntaxError as error:
            modules[name] = Module(name, shown, None, f"{error.msg} (line {error.lineno})")
    return modules


def imports_of(module: Module) -> list[Import]:
    """Every import in the module, at any depth, relative ones made absolute, by line."""
    assert module.tree is not None
    found: list[Import] = []

    def visit(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, (), node.lineno, type_only) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.name.split(".")
                if not module.is_package:
                    anchor.pop()
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = tuple(alias.name for alias in node.names)
            found.append(Import(base, names, node.lineno, type_only))
        elif (
            isinstance(node, ast.Call)
            and _called_name(node.func) in ("importlib.import_module", "import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith(".")
        ):
            found.append(Import(node.args[0].value, (), node.lineno, type_only))
        if isinstance(node, ast.If) and _called_name(node.test) in TYPE_CHECKING_NAMES:
            visit(node.test, type_only)
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_only)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, type_only)

    visit(module.tree, False)
    found.sort(key=lambda imp: imp.line)
    if COUNT_TYPE_ONLY_IMPORTS:
        return found
    return [imp for imp in found if not imp.type_only]


TYPE_CHECKING_NAMES = ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def _called_name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return f"{func.value.id}.{func.attr}"
    return ""


def disallowed_uses(tree: ast.Module, imported: str, allowed: frozenset[str]) -> list[Import]:
    """Where the module uses ``imported`` beyond its ``allowed`` names (``names``: the use)."""
    aliases: set[str] = set()
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == imported:
                    aliases.add(alias.asname or alias.name)
                elif alias.name.startswith(imported + "."):
                    found.append(Import(alias.name, (), node.lineno))
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module == imported:
                names = tuple(alias.name for alias in node.names if alias.name not in allowed)
                if names:
                    found.append(Import(imported, names, node.lineno))
            elif node.module.startswith(imported + "."):
                found.append(Import(node.module, (), node.lineno))
    # Each use of an alias must be `alias.<allowed name>`.
    fine = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in aliases
        and node.attr in allowed
    }
    found += [
        Import(imported, (node.id,), node.lineno)
        for node in ast.walk(tree)
        if isinstance(node, ast.Name) and node.id in aliases and id(node) not in fine
    ]
    return sorted(found, key=lambda imp: imp.line)


# ---------------------------------------------------------------------- the layering
MODULES = load_modules()

# The only upward imports allowed: the root package's lazy re-exports (PEP 562
# ``__getattr__``, run on first attribute access, never when ``dsched`` is imported).
LAZY_EXPORTS = frozenset({("dsched", "dsched.deploy")})  # dsched.LocalCluster


def layer_of(module: str) -> int | None:
    """Index in LAYERS of a dsched module (-1: the root package), or None if it has none."""
    if module == PACKAGE:
        return -1
    relative = module.removeprefix(PACKAGE + ".")
    best: tuple[int, int] | None = None  # (length of the matching member, layer index)
    for index, layer in enumerate(LAYERS):
        for member in layer.members:
            if relative == member or relative.startswith(member + "."):
                length = member.count(".") + 1
                if best is None or length > best[0]:
                    best = (length, index)
    return None if best is None else best[1]


def layer_name(index: int) -> str:
    return "dsched (root)" if index < 0 else LAYERS[index].name


def dsched_targets(imp: Import, modules: dict[str, Module]) -> list[str]:
    """The dsched modules an import depends on: ``from dsched.state import events`` names
    the module dsched.state.events, ``from dsched.comm import Comm`` the package dsched.comm."""
    if imp.module != PACKAGE and not imp.module.startswith(PACKAGE + "."):
        return []
    submodules = [f"{imp.module}.{name}" for name in imp.names]
    targets = [name for name in submodules if name in modules]
    return targets if targets and len(targets) == len(submodules) else [imp.module, *targets]


def upward_imports(modules: dict[str, Module]) -> list[Problem]:
    problems = []
    for module in modules.values():
        own = layer_of(module.name)
        if module.tree is None or own is None:
            continue  # reported by test_every_module_parses / test_every_module_has_a_layer
        for imp in imports_of(module):
            for target in dsched_targets(imp, modules):
                other = layer_of(target)
                if target not in modules:
                    why = "no such module under src/dsched"
                elif (
                    other is not None and other > own and (module.name, target) not in LAZY_EXPORTS
                ):
                    why = f"layer {layer_name(own)!r} is below {layer_name(other)!r}"
                else:
                    continue
                what = f"imports {target}" + (" (type-only)" if imp.type_only else "")
                problems.append(Problem(module, imp.line, what, why))
    return problems


def impure_imports(modules: dict[str, Module]) -> list[Problem]:
    problems = []
    for module in modules.values():
        index = layer_of(module.name)
        if module.tree is None or index is None or index < 0 or not LAYERS[index].pure:
            continue
        layer = LAYERS[index].name
        checked: set[str] = set()
        for imp in imports_of(module):
            top = imp.module.split(".")[0]
            if top not in FORBIDDEN_IN_PURE:
                continue
            # An allowance names a module or one of its submodules (the longest that fits).
            allowance = max(
                (m for m in ALLOWED_IN_PURE if imp.module == m or imp.module.startswith(m + ".")),
                key=len,
                default=top,
            )
            names, layers = ALLOWED_IN_PURE.get(allowance, (frozenset(), frozenset()))
            if layer not in layers:
                why = f"pure layer {layer!r} may not use {FORBIDDEN_IN_PURE[top]}"
                what = f"imports {imp.module}" + (" (type-only)" if imp.type_only else "")
                problems.append(Problem(module, imp.line, what, why))
            elif allowance not in checked:
                checked.add(allowance)
                why = f"pure layer {layer!r} may use only {', '.join(sorted(names))} of {allowance}"
                problems += [
                    Problem(module, use.line, f"uses {use.module} {' '.join(use.names)}", why)
                    for use in disallowed_uses(module.tree, allowance, names)
                ]
    return problems


# ---------------------------------------------------------------------- the rules
def fail_if(problems: list[str], title: str) -> None:
    if problems:
        pytest.fail(f"{title}:\n  " + "\n  ".join(problems), pytrace=False)


def test_every_module_parses() -> None:
    fail_if(
        [f"{m.shown}: {m.error}" for m in MODULES.values() if m.tree is None],
        "modules that do not parse",
    )


def test_every_module_has_a_layer() -> None:
    fail_if(
        sorted(name for name in MODULES if layer_of(name) is None),
        "modules in no layer (add their package to LAYERS in tests/unit/test_layers.py)",
    )


def test_layers_import_only_downwards() -> None:
    fail_if([str(p) for p in upward_imports(MODULES)], "imports against the layering")


def test_pure_layers_do_no_io() -> None:
    fail_if([str(p) for p in impure_imports(MODULES)], "I/O, clock or event loop in a pure layer")


def test_no_source_file_is_too_long() -> None:
    long = []
    for path in sorted(SRC.rglob("*.py")):
        with path.open("rb") as f:
            n = sum(1 for _ in f)
        if n > MAX_LINES:
            long.append(f"{path.relative_to(SRC.parent)}: {n} lines")
    fail_if(long, f"source files over {MAX_LINES} lines (split them)")


# ---------------------------------------------------------------------- the checker itself
def fake_tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Module]:
    for relative, text in {"__init__.py": "", **files}.items():
        path = tmp_path / "src" / PACKAGE / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return load_modules(tmp_path / "src")


def test_checker_sees_every_kind_of_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    modules = fake_tree(
        tmp_path,
        {
            "wire/__init__.py": "",
            "comm/__init__.py": "",
            "server/__init__.py": "",
            "tools/__init__.py": "",
            "state/__init__.py": "from . import a\n",
            "state/b.py": "",
            "state/a.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n"
                "    from dsched.comm import Comm\n"  # 3: type-only, still counts
                "def f():\n"
                "    import dsched.server\n"  # 5
                "    from ..tools import thing\n"  # 6: relative
                "    importlib.import_module('dsched.server')\n"  # 7
                "from . import b\n"  # same layer: fine
                "from dsched.wire import x\n"  # a lower layer: fine
                "import dsched\n"  # the root package: fine
                "import dsched.trace\n"  # 11: no such module
            ),
        },
    )
    found = [(p.module.name, p.line, p.target) for p in upward_imports(modules)]
    assert found == [
        ("dsched.state.a", 3, "imports dsched.comm (type-only)"),
        ("dsched.state.a", 5, "imports dsched.server"),
        ("dsched.state.a", 6, "imports dsched.tools"),
        ("dsched.state.a", 7, "imports dsched.server"),
        ("dsched.state.a", 11, "imports dsched.trace"),
    ]
    assert str(upward_imports(modules)[0]) == (
        "dsched.state.a (src/dsched/state/a.py:3) imports dsched.comm (type-only): "
        "layer 'state' is below 'comm'"
    )
    monkeypatch.setitem(globals(), "COUNT_TYPE_ONLY_IMPORTS", False)
    assert [p.line for p in upward_imports(modules)] == [5, 6, 7, 11]


def test_checker_longest_member_wins() -> None:
    assert layer_of("dsched.sim.engine") == [layer.name for layer in LAYERS].index("sim")
    assert layer_of("dsched.sim.cli") == len(LAYERS) - 1
    assert layer_of("dsched.simulator") is None
    assert layer_of("dsched") == -1


@pytest.mark.parametrize(
    ("source", "bad"),
    [
        ("import random\nrng = random.Random(3)\n", False),
        ("import random as r\ndef f(seed: int) -> r.Random:\n    return r.Random(seed)\n", False),
        ("from random import Random\n", False),
        ("import random\nx = random.random()\n", True),
        ("from random import shuffle\n", True),
        ("import random\ngenerator = random\n", True),
        ("import time\n", True),
        ("def f():\n    import asyncio\n", True),
        ("import logging\n", True),
        ("import concurrent.futures\n", True),
        ("import dask.utils\nimport heapq\n", False),
    ],
)
def test_checker_pure_rules(tmp_path: Path, source: str, bad: bool) -> None:
    modules = fake_tree(tmp_path, {"sim/__init__.py": "", "sim/x.py": source})
    assert bool(impure_imports(modules)) == bad


def test_checker_threading_local_only_in_wire(tmp_path: Path) -> None:
    source = "import threading\n_per_thread = threading.local()\n"
    modules = fake_tree(tmp_path, {"wire/x.py": source, "state/y.py": source, "comm/z.py": source})
    assert [str(p) for p in impure_imports(modules)] == [
        "dsched.state.y (src/dsched/state/y.py:1) imports threading: "
        "pure layer 'state' may not use threads"
    ]
