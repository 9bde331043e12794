"""README's commands stay true: CI runs the test command the README shows; the CLI it names exists."""

import pathlib
import re

from lora_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _first_code_block() -> str:
  text = (ROOT / "README.md").read_text()
  m = re.search(r"```bash\n(.*?)```", text, re.S)
  assert m, "README.md must start with a bash block holding the two commands"
  return m.group(1)


def test_readme_test_command_is_what_ci_runs():
  block = _first_code_block()
  ci = (ROOT / ".ci" / "run").read_text()
  assert "python -m pytest -q" in block and "python -m pytest -q" in ci
  assert "pip install -e '.[dev,interop]'" in block and "pip install -q -e '.[dev,interop]'" in ci


def test_readme_main_command_exists():
  block = _first_code_block()
  commands = re.findall(r"lora-jax (\w[\w-]*)", block)
  assert commands, "README's first block must run a lora-jax command"
  for c in commands:
    assert c in cli.COMMANDS or c == "--help"
