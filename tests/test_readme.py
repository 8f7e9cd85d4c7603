"""The README starts with the two commands (the second is what CI runs), and its Python example
runs as written."""

import os
import re

ROOT = os.path.join(os.path.dirname(__file__), "..")


def read(name: str) -> str:
  with open(os.path.join(ROOT, name), encoding="utf-8") as f:
    return f.read()


def test_readme_starts_with_the_two_commands():
  readme = read("README.md")
  first = re.search(r"```bash\n(.*?)```", readme, re.S)
  assert first and not re.search(r"^#+ |[^\s#]", readme[readme.index("\n"):first.start()], re.M), \
      "the first thing after the title is the commands block"
  commands = [l for l in first.group(1).splitlines() if l and not l.startswith("#")]
  assert len(commands) == 2, commands
  demo, tests = commands
  assert "pip install -e ." in demo and "python -m experiments.run --config" in demo
  assert "--workdir /tmp/quee_demo" in demo
  ci = [l for l in read(".ci/run").splitlines() if l and not l.startswith(("#", "set ", "cd "))]
  assert ci == [tests], "the README's test command and .ci/run's differ"


def test_readme_example_runs(capsys):
  blocks = re.findall(r"```python\n(.*?)```", read("README.md"), re.S)
  assert len(blocks) == 1, "one Python example (the rest lives in docs/)"
  for code in blocks:
    exec(compile(code, "README.md", "exec"), {})
  assert capsys.readouterr().out.strip()
