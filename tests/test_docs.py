"""The documentation is true to the code: every ``python`` block of README.md,
CONTRIBUTING.md and docs/ runs as written, each in a fresh namespace; every ``bash`` block
names scripts, options and extras that exist; and the site builds in strict mode."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import pergrad

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted(
    [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *(ROOT / "docs").rglob("*.md")],
    key=lambda path: str(path),
)
PAGES = [page for page in PAGES if page.exists()]


FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```", flags=re.DOTALL | re.MULTILINE)
"""A fenced block: its language (``python`` and ``bash`` are checked; ``text`` and unmarked
blocks hold no code) and its text."""


def blocks(page: Path, language: str) -> list[str]:
    return [code for lang, code in FENCE.findall(page.read_text()) if lang == language]


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


PYTHON = [(page, i) for page in PAGES for i, _ in enumerate(blocks(page, "python"))]
BASH = [(page, i) for page in PAGES for i, _ in enumerate(blocks(page, "bash"))]


@pytest.mark.parametrize("page", PAGES, ids=[_name(p) for p in PAGES])
def test_code_is_fenced_in_a_language_the_tests_check(page):
    """Code in ``py``, ``sh``, ``console`` or any other fence would escape the checks below."""
    languages = {lang for lang, _ in FENCE.findall(page.read_text())}
    assert languages <= {"python", "bash", "text", ""}, languages


def test_the_pages_hold_code_to_check():
    assert {_name(page) for page, _ in PYTHON} >= {"README.md", "docs/guide/statistics.md"}


@pytest.mark.parametrize(("page", "index"), PYTHON, ids=[f"{_name(p)}-{i}" for p, i in PYTHON])
def test_python_blocks_run_as_written(page, index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    rules = dict(pergrad.rules.RULES)
    try:
        code = compile(blocks(page, "python")[index], _name(page), "exec")
        exec(code, {"__name__": "__docs__"})  # a fresh namespace: no leftovers
    finally:  # a page may register a rule of its own
        pergrad.rules.RULES.clear()
        pergrad.rules.RULES.update(rules)


def _commands(block: str) -> list[list[str]]:
    """Each command of a bash block, split into words; comments, prompts and environment
    assignments off; ``a && b``, ``a; b`` and ``a | b`` give two commands."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip().removeprefix("$ ")
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"&&|;|\|", line):
            words = shlex.split(part)
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
                words = words[1:]
            if words:
                commands.append(words)
    return commands


def _help(script: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(("page", "index"), BASH, ids=[f"{_name(p)}-{i}" for p, i in BASH])
def test_bash_blocks_name_what_exists(page, index):
    """``python script.py --option``: the script exists and its --help lists the option;
    ``pip install -e ".[extra]"``: the extras exist; ``torchrun``/``accelerate launch``
    scripts exist."""
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1]
    extras = set(re.findall(r"^(\w+) = \[", section.split("\n[")[0], flags=re.MULTILINE))
    assert "test" in extras
    for words in _commands(blocks(page, "bash")[index]):
        if "install" in words and "-e" in words:
            wanted = re.fullmatch(r"\.(?:\[(.*)\])?", words[words.index("-e") + 1])
            assert wanted, words
            assert set(filter(None, (wanted.group(1) or "").split(","))) <= extras, words
        scripts = [w for w in words if w.endswith(".py")]
        for script in scripts:
            assert (ROOT / script).is_file(), f"{_name(page)}: {script} does not exist"
        if scripts:  # python [-u] x.py, torchrun ... x.py, accelerate launch ... x.py
            listed = _help(ROOT / scripts[0])
            after = words[words.index(scripts[0]) + 1 :]
            for option in (w.split("=")[0] for w in after if w.startswith("--")):
                pattern = rf"(?<![\w-]){re.escape(option)}(?![\w-])"
                assert re.search(pattern, listed), f"{_name(page)}: {scripts[0]} has no {option}"
        if words[0].endswith(".sh"):
            assert (ROOT / words[0]).is_file(), words


def test_the_site_builds_in_strict_mode(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "reference" / "pergrad" / "index.html").is_file()
