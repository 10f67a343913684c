"""The docs run: every code block of README.md, CONTRIBUTING.md and docs/*.md, and the package's doctests.

The convention (written down in CONTRIBUTING.md):

* a ```` ```python ```` block is executed; the blocks of one file run in
  order in one namespace (a page reads as one session), in a temporary
  working directory, on the tiny pipelines of :mod:`tgate_fx.tiny`;
* a ```` ```python no-run ```` block needs real weights, a GPU or a long
  run: it is compiled (its syntax) and every ``tgate_fx`` name it imports
  must exist, but it does not run;
* a ```` ```bash ```` block is checked command by command: ``tgate-fx ...``
  lines must parse with the CLI's own argument parser, scripts and
  benchmark files must exist, ``python -m`` modules must be importable,
  ``pip install 'tgate-fx[extra]'`` extras must be declared in pyproject.toml;
* a block with no language (diagrams, file trees) is text.

Relative links must point at files that exist, and the README's table of
families and methods must say what tests/test_matrix.py expects.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import importlib.util
import os
import pathlib
import pkgutil
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^`]*)$")
KNOWN_INFO = {"python", "python no-run", "bash", ""}


def _blocks(page: pathlib.Path) -> list[tuple[int, str, str]]:
    """``(line, info, code)`` of every fenced block of ``page``; an indented block loses its indent."""
    out, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, info, start = m["indent"], m["info"].strip(), i + 1
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{page.name}:{start}: unclosed code block")
        out.append((start, info, "\n".join(body) + "\n"))
        i += 1
    return out


def _rel(page: pathlib.Path) -> str:
    return str(page.relative_to(ROOT))


def test_every_page_exists_and_every_block_has_a_known_kind():
    for name in ("README.md", "CONTRIBUTING.md", "docs/tgate.md", "docs/deepcache.md", "docs/todo.md", "docs/toca.md",
                 "docs/capture-cache.md", "docs/compile.md", "docs/onnx.md", "docs/families.md", "docs/quality.md",
                 "docs/benchmarks.md"):
        assert (ROOT / name).is_file(), name
    for page in PAGES:
        for line, info, _ in _blocks(page):
            assert info in KNOWN_INFO, f"{_rel(page)}:{line}: unknown block kind {info!r} (use one of {KNOWN_INFO})"


# --- python blocks -------------------------------------------------------------------------------------------------
RUNNABLE = [p for p in PAGES if any(info == "python" for _, info, _ in _blocks(p))]


@pytest.mark.e2e  # tiny pipelines end to end: most of this file's time
@pytest.mark.parametrize("page", RUNNABLE, ids=_rel)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write (ONNX bundles) write here
    monkeypatch.setenv("TGATE_FX_CACHE_DIR", str(tmp_path / "captures"))
    namespace = {"__name__": "__docs__"}
    for line, info, code in _blocks(page):
        if info == "python":
            exec(compile(code, f"{_rel(page)}:{line}", "exec"), namespace)


NO_RUN = [(p, line, code) for p in PAGES for line, info, code in _blocks(p) if info == "python no-run"]


@pytest.mark.parametrize("page,line,code", NO_RUN, ids=[f"{_rel(p)}:{n}" for p, n, _ in NO_RUN])
def test_no_run_blocks_compile_and_import_what_exists(page, line, code):
    tree = ast.parse(code, f"{_rel(page)}:{line}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tgate_fx"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}"), (
                    f"{_rel(page)}:{line}: {node.module} has no {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tgate_fx"):
                    importlib.import_module(alias.name)


def test_no_run_blocks_are_few():
    # the convention is an exception for real weights, GPUs and long runs, not a way around the test
    runnable = sum(1 for p in PAGES for _, info, _ in _blocks(p) if info == "python")
    assert len(NO_RUN) <= runnable, f"{len(NO_RUN)} no-run blocks against {runnable} that run"


# --- shell blocks --------------------------------------------------------------------------------------------------
def _cli_parser():
    from tgate_fx.cli import _parser

    return _parser()


def _extras() -> set[str]:
    # the keys of [project.optional-dependencies] (tomllib is Python 3.11+; the package supports 3.10)
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^(\w+)\s*=", section, re.M))


def _check_command(words: list[str], where: str) -> None:
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # VAR=value prefixes
        words = words[1:]
    head, args = words[0], words[1:]
    if head in ("tgate-fx", ".venv/bin/tgate-fx"):
        if args == ["--help"] or args[1:] == ["--help"]:
            assert not args[1:] or args[0] in _cli_parser()._subparsers._group_actions[0].choices, where
            return
        try:
            _cli_parser().parse_args(args)
        except SystemExit as e:
            raise AssertionError(f"{where}: `tgate-fx {' '.join(args)}` does not parse") from e
    elif head.startswith("./scripts/"):
        path = ROOT / head
        assert path.is_file() and os.access(path, os.X_OK), f"{where}: {head} is not an executable script"
        if head == "./scripts/generate.sh":  # it passes its arguments on to `tgate-fx generate`
            _check_command(["tgate-fx", "generate", *args], where)
    elif head == "python" and args[:1] == ["-m"]:
        assert importlib.util.find_spec(args[1]) is not None, f"{where}: no module {args[1]}"
    elif head == "python":
        assert (ROOT / args[0]).is_file(), f"{where}: no file {args[0]}"
    elif head == "pip" and args[:1] == ["install"]:
        for spec in args[1:]:
            m = re.fullmatch(r"(?:tgate-fx|\.)\[(\w+)\]", spec)
            if m:
                assert m[1] in _extras(), f"{where}: pyproject.toml declares no extra {m[1]!r}"
            else:
                assert spec in ("-e", "."), f"{where}: unexpected pip argument {spec!r}"
    else:
        raise AssertionError(f"{where}: the docs test does not know the command {head!r}; teach it or drop it")


SHELL = [(p, line, code) for p in PAGES for line, info, code in _blocks(p) if info == "bash"]


@pytest.mark.parametrize("page,line,code", SHELL, ids=[f"{_rel(p)}:{n}" for p, n, _ in SHELL])
def test_shell_blocks_name_what_exists(page, line, code):
    for offset, text in enumerate(code.splitlines()):
        text = text.split(" #")[0].strip()
        if not text or text.startswith("#"):
            continue
        _check_command(shlex.split(text), f"{_rel(page)}:{line + offset + 1}")


def test_the_readme_names_the_two_commands():
    # .ci/run calls ./scripts/test.sh: the README's test command; generate.sh is the main job
    readme_shell = "".join(code for _, info, code in _blocks(ROOT / "README.md") if info == "bash")
    for command in ("./scripts/generate.sh", "./scripts/test.sh"):
        assert re.search(rf"^{re.escape(command)}\b", readme_shell, re.M), command
    assert "./scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


# --- links ---------------------------------------------------------------------------------------------------------
LINK = re.compile(r"\]\((?!https?://)(?P<target>[^)#\s]*)(?:#(?P<anchor>[^)\s]*))?\)")


def _anchors(page: pathlib.Path) -> set[str]:
    """GitHub's heading anchors of a markdown page (code blocks skipped)."""
    out, fenced = set(), False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            out.add(re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-"))
    return out


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_point_at_files_and_headings(page):
    missing = []
    for m in LINK.finditer(page.read_text()):
        target = page.parent / m["target"] if m["target"] else page
        if not target.exists():
            missing.append(m["target"])
        elif m["anchor"] and target.suffix == ".md" and m["anchor"] not in _anchors(target):
            missing.append(f"{m['target']}#{m['anchor']}")
    assert not missing, f"{_rel(page)} links to missing files or headings: {missing}"


# --- the families x methods table ----------------------------------------------------------------------------------
def test_the_readme_table_says_what_the_matrix_expects():
    from test_matrix import _CLASS, METHODS, REFUSED

    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("| family | T-GATE | DeepCache | ToDo | ToCa | Block cache |")
    seen = set()
    for row in lines[start + 2:]:
        if not row.startswith("|"):
            break
        cells = [c.strip() for c in row.strip("|").split("|")]
        families = [f for f in re.findall(r"`(\w+)`", cells[0]) if f in _CLASS]
        assert families, f"README table row names no matrix family in backticks: {row}"
        for family in families:
            seen.add(family)
            for method, cell in zip(METHODS, cells[1:]):
                served = cell.lower().startswith("yes")
                assert served or cell.lower().startswith(("no", "refused")), f"{family} x {method}: {cell!r}"
                assert served == ((family, method) not in REFUSED), (
                    f"README says {family} x {method} is {'served' if served else 'refused'}: {cell!r}")
    assert seen == set(_CLASS), f"families missing from the README table: {sorted(set(_CLASS) - seen)}"


# --- doctests ------------------------------------------------------------------------------------------------------
def _modules() -> list[str]:
    import tgate_fx

    return sorted(m.name for m in pkgutil.walk_packages(tgate_fx.__path__, "tgate_fx."))


DOCTESTED = [name for name in _modules()
             if doctest.DocTestFinder().find(importlib.import_module(name)) and
             any(t.examples for t in doctest.DocTestFinder().find(importlib.import_module(name)))]


@pytest.mark.parametrize("name", DOCTESTED)
def test_doctests(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} doctest example(s) of {name} failed (run with -s to see them)"
