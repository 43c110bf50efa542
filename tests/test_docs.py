"""Every python block of every docs page runs as written, each on its own (a reader copies one block at a time),
without warnings. A block that needs no running (a fragment shown for its shape) is fenced as ``py`` instead."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(DOCS.rglob("*.md"))


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def test_docs_python_blocks_run(tmp_path, monkeypatch):
    for page in PAGES:
        for number, code in enumerate(python_blocks(page)):
            monkeypatch.chdir(tmp_path)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                exec(compile(code, f"{page.relative_to(DOCS)} python block {number}", "exec"), {})
            shown = [w for w in caught if issubclass(w.category, UserWarning)]
            assert not shown, (page.name, number, [str(w.message) for w in shown])


def test_the_docs_have_pages():
    assert (DOCS / "index.md").exists()
