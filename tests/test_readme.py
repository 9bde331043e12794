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


def _layout_modules() -> set[str]:
  """The lora_jax modules the README's Layout block lists ("pkg/" headers, then "mod.py" lines)."""
  text = (ROOT / "README.md").read_text()
  m = re.search(r"## Layout\n.*?```\n(.*?)```", text, re.S)
  assert m, "README.md needs a Layout section with a code block"
  listed, package = set(), None
  for line in m.group(1).splitlines():
    name = line.strip().split(" ", 1)[0] if line.strip() else ""
    indent = len(line) - len(line.lstrip())
    if indent == 0:
      package = None
    elif indent == 2 and name.endswith("/"):
      package = name
    elif indent == 2 and name.endswith(".py"):
      listed.add(name)
    elif indent == 4 and name.endswith(".py") and package:
      listed.add(package + name)
  return listed


def test_readme_layout_lists_every_module():
  tree = {str(p.relative_to(ROOT / "lora_jax")) for p in (ROOT / "lora_jax").rglob("*.py")}
  optional = {p for p in tree if p.endswith("/__init__.py")}  # a package's line covers it
  listed = _layout_modules()
  assert tree - optional - listed == set(), "modules missing from README's Layout section"
  assert listed - tree == set(), "README's Layout section lists modules that do not exist"
