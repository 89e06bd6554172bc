"""The README's Python examples run as written."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _python_blocks():
  with open(README) as f:
    text = f.read()
  return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_example_runs(index):
  namespace = {}
  exec(compile(_python_blocks()[index], f"README.md example {index}", "exec"), namespace)
