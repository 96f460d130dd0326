"""The package's shape: one-way imports, no cycle, no private name borrowed across modules,
and every option declared once."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import scimpute_dask
from scimpute_dask import config
from scimpute_dask.cli import build_parser

PACKAGE = Path(scimpute_dask.__file__).parent

#: The layers, lowest first: a module may import only from its own layer or below.
LAYERS = (
    ("scimpute_dask",),  # the package itself: only __version__ is taken from it
    ("scimpute_dask.errors",),
    ("scimpute_dask.checks", "scimpute_dask.config"),
    ("scimpute_dask.plan",),
    # pure functions on arrays, which readers may use too (a conversion records the
    # genes' maxima as it writes)
    ("scimpute_dask.kernels",),
    ("scimpute_dask.io",),
    ("scimpute_dask.engine",),
    ("scimpute_dask.export",),
    ("scimpute_dask.plotting",),
    ("scimpute_dask.tools",),
    ("scimpute_dask.pipeline",),
    ("scimpute_dask.compat", "scimpute_dask.api", "scimpute_dask.synthetic"),
    ("scimpute_dask.cli",),
)


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _walk(node: ast.AST):
    """Every node, function bodies included, except ``if TYPE_CHECKING:`` blocks."""
    for child in ast.iter_child_nodes(node):
        if _is_type_checking(child):
            yield from (n for c in child.orelse for n in _walk_self(c))
            continue
        yield child
        yield from _walk(child)


def _walk_self(node: ast.AST):
    yield node
    yield from _walk(node)


def _imports(module: str) -> tuple[set[str], list[str]]:
    """The package modules ``module`` imports (at any depth) and its private borrowings."""
    tree = ast.parse(MODULES[module].read_text())
    is_package = MODULES[module].name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    targets, private, aliases = set(), [], {}
    for node in _walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "scimpute_dask":
                    targets.add(alias.name)
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            if source.split(".")[0] != "scimpute_dask":
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in MODULES:
                    targets.add(sub)
                    aliases[alias.asname or alias.name] = sub
                else:
                    targets.add(source)
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append(f"{module} imports {alias.name} from {source}")
    for node in _walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in aliases and node.attr.startswith("_") \
                and not node.attr.startswith("__") and aliases[node.value.id] != module:
            private.append(f"{module} uses {aliases[node.value.id]}.{node.attr}")
    return {t for t in targets if t != module}, private


GRAPH = {m: _imports(m) for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _layer(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            best = i
    return best


def test_the_import_graph_has_no_cycle():
    graph = {m: targets for m, (targets, _) in GRAPH.items()}
    assert _cycles(graph) == []
    # the check itself finds a cycle when there is one
    assert _cycles({**graph, "scimpute_dask.errors": {"scimpute_dask.cli"}}) != []


def test_no_private_name_is_imported_from_another_module():
    borrowed = [line for _, private in GRAPH.values() for line in private]
    assert borrowed == []


def test_imports_flow_one_way_through_the_layers():
    upward = [f"{m} -> {t}" for m, (targets, _) in GRAPH.items() for t in targets
              if _layer(t) > _layer(m)]
    assert upward == []
    assert all(any(_layer(m) == i for i in range(len(LAYERS))) for m in MODULES)


def test_the_folder_listing_shows_the_pipeline():
    subpackages = sorted(p.name for p in PACKAGE.iterdir()
                         if p.is_dir() and (p / "__init__.py").exists())
    assert subpackages == ["engine", "export", "io", "kernels", "plotting", "tools"]
    assert len([p for p in PACKAGE.glob("*.py")]) <= 12


def test_import_and_help_do_not_load_the_heavy_libraries():
    code = ("import sys, scimpute_dask.cli as c\n"
            "heavy = {'dask', 'distributed', 'zarr', 'numba', 'matplotlib', 'pandas', "
            "'sklearn', 'anndata', 'numpy'}\n"
            "print(sorted(heavy & set(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "[]"


# --------------------------------------------------------------------------- #
# One declaration per option
# --------------------------------------------------------------------------- #
def _defaults(func) -> dict:
    return {name: p.default for name, p in inspect.signature(func).parameters.items()
            if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize(("func", "names", "overrides"), [
    (scimpute_dask.run_imputation, config.RUN_OPTIONS, {}),
    (scimpute_dask.cross_validate, config.VALIDATE_OPTIONS, {"consider_clusters": False}),
])
def test_python_signatures_take_every_option_with_its_declared_default(func, names,
                                                                        overrides):
    defaults = _defaults(func)
    for name in names:
        expected = overrides.get(name, config.OPTIONS[name].default)
        assert defaults[name] == expected, name
        assert f"{name}\n" in func.__doc__ or name in func.__doc__, name
    assert "{options}" not in func.__doc__


def test_impute_defaults_agree_with_the_declarations():
    defaults = _defaults(scimpute_dask.impute)
    for name in set(defaults) & set(config.OPTIONS):
        if name != "progress":
            assert defaults[name] == config.OPTIONS[name].default, name


def test_every_default_satisfies_its_own_constraint():
    for option in config.OPTIONS.values():
        option.constraint.check(option.default, option.name)
    assert config.RunConfig().k == config.OPTIONS["k"].default


def test_cli_flags_and_defaults_come_from_the_declarations():
    parser = build_parser()
    run = next(a for a in parser._actions if a.dest == "command").choices["run"]
    flags = {a.dest: a for a in run._actions}
    for name in config.RUN_OPTIONS:
        option = config.OPTIONS[name]
        if option.flag is None:
            assert name not in flags
            continue
        assert option.flag in flags[name].option_strings
        assert option.help in flags[name].help


def test_run_json_parameters_are_declared_options():
    from scimpute_dask.pipeline import RECORDED

    assert set(RECORDED) - set(config.OPTIONS) == {"threads"}
