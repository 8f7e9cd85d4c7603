"""The README's Python example runs as written."""

import os
import re


def test_readme_example_runs(capsys):
  readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
  blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
  assert blocks
  for code in blocks:
    exec(compile(code, "README.md", "exec"), {})
  assert capsys.readouterr().out.strip()
