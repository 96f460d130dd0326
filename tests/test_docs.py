"""The documentation: the site builds with warnings as errors, its tutorials executed, and
every other code block of the docs and the README is held to the code it describes."""

from __future__ import annotations

import ast
import inspect
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import scimpute_dask
from scimpute_dask.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [*sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts),
         ROOT / "README.md"]
FENCE = re.compile(r"^```(\S*)")


def code_blocks(path: Path) -> list[tuple[str, int, str]]:
    """``(language, first line, text)`` of every fenced block of a Markdown page; MyST
    directives (``{code-cell}``, ``{toctree}`` …) are left out: the build checks them."""
    blocks, lines, at = [], path.read_text().splitlines(), 0
    while at < len(lines):
        opened = FENCE.match(lines[at])
        if opened is None:
            at += 1
            continue
        end = next(i for i in range(at + 1, len(lines)) if lines[i].startswith("```"))
        if not opened.group(1).startswith("{"):
            blocks.append((opened.group(1), at + 1, "\n".join(lines[at + 1 : end])))
        at = end + 1
    return blocks


def shell_commands(language: str, text: str) -> list[str]:
    """The commands of a ``console`` block (``$`` lines) or a ``bash`` block (every line),
    continuations joined, comments dropped, ``&&`` chains split."""
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = [line[2:] for line in joined.splitlines() if line.startswith("$ ")] \
        if language == "console" else joined.splitlines()
    commands = []
    for line in lines:
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        commands += [c.strip() for c in line.split("&&") if c.strip()]
    return commands


def _blocks(*languages: str) -> list:
    return [pytest.param(page, line, language, text, id=f"{page.relative_to(ROOT)}:{line}")
            for page in PAGES for language, line, text in code_blocks(page)
            if language in languages]


def test_the_docs_have_code_to_check():
    assert len(_blocks("bash", "console")) >= 10 and len(_blocks("python")) >= 5


@pytest.mark.parametrize(("page", "line", "language", "text"), _blocks("bash", "console"))
def test_every_documented_command_is_accepted(page, line, language, text):
    """``scimpute-dask`` commands are parsed by the command's own parser (every option
    and value as documented exists and is accepted); scripts exist; extras are declared."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for command in shell_commands(language, text):
        words = shlex.split(command)
        if "scimpute-dask" in words:
            args = words[words.index("scimpute-dask") + 1 :]
            try:
                build_parser().parse_args(args)
            except SystemExit:
                pytest.fail(f"{page.name}:{line}: the CLI refuses: {command}")
        for word in words:
            if word.endswith(".py") and "/" in word and not word.startswith("/"):
                assert (ROOT / word).is_file(), f"{page.name}:{line}: no {word}"
            extra = re.fullmatch(r"\.\[([\w,-]+)\]", word) or \
                re.fullmatch(r"scimpute-dask\[([\w,-]+)\]", word)
            if extra:
                for name in extra.group(1).split(","):
                    assert name in extras, f"{page.name}:{line}: no extra {name!r}"


@pytest.mark.parametrize(("page", "line", "language", "text"), _blocks("python"))
def test_every_documented_call_matches_the_api(page, line, language, text):
    """Python blocks compile, and every call of a ``scimpute_dask`` function passes
    arguments its signature takes."""
    tree = ast.parse(text, filename=f"{page.name}:{line}")
    imported = {alias.asname or alias.name: alias.name for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module == "scimpute_dask"
                for alias in node.names}
    for name in imported.values():
        assert hasattr(scimpute_dask, name), f"{page.name}:{line}: no scimpute_dask.{name}"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) \
                and func.value.id == "scimpute_dask":
            name = func.attr
        elif isinstance(func, ast.Name) and func.id in imported:
            name = imported[func.id]
        else:
            continue
        target = getattr(scimpute_dask, name, None)
        assert target is not None, f"{page.name}:{line}: no scimpute_dask.{name}"
        try:
            inspect.signature(target).bind_partial(
                *[None] * len(node.args), **{k.arg: None for k in node.keywords if k.arg})
        except TypeError as err:
            pytest.fail(f"{page.name}:{line}: scimpute_dask.{name}: {err}")


def test_the_site_builds_without_a_warning_and_runs_its_tutorials(tmp_path):
    """Sphinx with warnings as errors; both tutorials executed (a failing cell fails the
    build); the API and CLI references generated."""
    for module in ("sphinx", "myst_nb", "sphinxarg", "sphinx_book_theme", "ipykernel"):
        pytest.importorskip(module, reason="pip install '.[docs]'")
    if not (ROOT.parent / "shared" / "data" / "mc_cortex").is_dir() and \
            "SCIMPUTE_MC_DATA" not in os.environ:
        pytest.skip("the Molecular Cartography sections are not beside the repository")
    out = tmp_path / "html"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
           f"{os.environ.get('PATH', '')}"}
    # the kernel draws inline, as in a notebook; nothing cached from another build
    for name in ("MPLBACKEND", "SCIMPUTE_DOCS_CACHE"):
        env.pop(name, None)
    built = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b",
                            "html", str(DOCS), str(out)], capture_output=True, text=True,
                           env=env, timeout=600, cwd=ROOT)
    assert built.returncode == 0, built.stderr[-4000:]
    mc = (out / "tutorials" / "mc_cortex.html").read_text()
    assert "held-out Pearson over 50 genes" in mc and "Held-out scores of" in mc
    assert mc.count("<img") >= 2  # the histogram and the maps, drawn at build time
    xenium = (out / "tutorials" / "xenium.html").read_text()
    assert "genes measured" in xenium and xenium.count("<img") >= 2
    assert "Pearson per unmeasured gene" in xenium
    cli = (out / "reference" / "cli.html").read_text()
    assert all(flag in cli for flag in ("--search", "--recall", "--impute-genes", "--table"))
    impute = (out / "reference" / "generated" / "scimpute_dask.impute.html").read_text()
    assert "cluster_key" in impute and "adata_spatial" in impute
