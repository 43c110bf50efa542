"""The docs site: every python block of every page runs as written, each on its own (a reader copies one block at a
time), without warnings, and so does every ``mmprefix`` command of its bash blocks; the site builds with
``mkdocs build --strict`` (a broken link, a missing anchor or a page left out of the navigation fails it). A block
that needs no running (a fragment shown for its shape) is fenced as ``py`` instead."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))


def blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), flags=re.S)


def commands(page: Path) -> list[str]:
    return [line for block in blocks(page, "bash") for line in block.splitlines() if line.startswith("mmprefix ")]


def test_docs_python_blocks_and_commands_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for page in PAGES:
        for number, code in enumerate(blocks(page, "python")):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                exec(compile(code, f"{page.relative_to(DOCS)} python block {number}", "exec"), {})
            shown = [w for w in caught if issubclass(w.category, UserWarning)]
            assert not shown, (page.name, number, [str(w.message) for w in shown])
        for command in commands(page):  # after the page's python blocks, which may write what a command reads
            result = subprocess.run([sys.executable, "-m", "mmprefix.cli", *shlex.split(command)[1:]],
                                    capture_output=True, text=True)
            assert result.returncode == 0, (page.name, command, result.stderr)


def test_the_docs_have_pages_and_show_the_sites_command():
    assert (DOCS / "index.md").exists()
    assert any(command.startswith("mmprefix sites ") for page in PAGES for command in commands(page))


def test_the_site_builds_strictly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("add_prefix") > 1  # the reference rendered
