"""README's examples run as written: every python block on its own (each is a standalone snippet a reader may
copy), without warnings, and its shell commands."""

import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_readme_python_examples_and_commands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for number, code in enumerate(blocks("python")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exec(compile(code, f"README.md python block {number}", "exec"), {})  # a fresh namespace: standalone
        shown = [w for w in caught if issubclass(w.category, UserWarning)]  # Deprecation/FutureWarning are not
        assert not shown, (number, [str(w.message) for w in shown])
    commands = [line for block in blocks("bash") for line in block.splitlines() if line.startswith("mmprefix ")]
    assert commands, "README shows the mmprefix command"
    for command in commands:
        args = shlex.split(command)
        result = subprocess.run([sys.executable, "-m", "mmprefix.cli", *args[1:]], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "prefix parameters" in result.stdout


def test_readme_starts_with_the_two_commands():
    first = blocks("bash")[0].strip().splitlines()
    assert first[0].endswith("python recipes/vqa.py") and first[1] == "python -m pytest"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\npython -m pytest\n" in ci


def test_quickstart_runs():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "saved, reloaded, same answers" in result.stdout
