"""README's examples run as written: every python block in order, in one namespace, and its shell commands."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_readme_python_examples_and_commands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for code in blocks("python"):
        exec(compile(code, "README.md", "exec"), namespace)
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
