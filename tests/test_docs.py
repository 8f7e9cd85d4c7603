"""The documentation holds what a fresh clone has.

  * no absolute path of a development machine in any text file of the repository, except
    system locations and example values (in tmp, or a path/to placeholder) of --workdir /
    --config / --data_dir arguments;
  * every repository path that README.md, docs/ and the notebooks' markdown cite exists;
  * every table and figure in docs/results/ comes with the command that reproduces it
    (`python -m experiments.... --workdir DIR`) in its section, and every figure file there
    is shown by one of them;
  * README.md is a guide, not a lab notebook: at most 15,000 bytes and 250 lines.
"""

import glob
import json
import os
import re
import subprocess

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# --- absolute paths ---------------------------------------------------------------------

# A path that starts at the root: a "/" at the start of a token (line start, space, quote,
# backtick, bracket, "=" or ","), then at least two names. "a/b", "{x}/y", "https://h/p",
# "~/.cache", "1/16", "../x" and one-name strings such as a key suffix "/kernel" are not.
ABSOLUTE = re.compile(
    r"(?:^|(?<=[\s\"'`(\[=,]))/(?=[A-Za-z_]|\.[A-Za-z])[\w.-]+(?:/[\w.*-]+)+/?")
# System locations a user's machine has (or Colab's runtime root); never our machines' own.
SYSTEM = ("/usr", "/etc", "/dev", "/bin", "/proc", "/sys", "/content")
# An example value of a command-line argument: `--workdir /tmp/quee_fm`,
# `--config.init_from=/path/to/ckpt.npz`: an example lives in tmp or is a path/to placeholder.
# `--workdirs /tmp/a,/tmp/b`: each of a list of examples.
ARGUMENT = re.compile(r"--(?:workdirs?|data_dir|config(?:\.[\w.]+)?)(?:=|\s+)(?:/tmp/[\w.-]+,)*$")
EXAMPLE = ("/" + "tmp/", "/" + "path/to/")
BINARY = (".png", ".jpg", ".jpeg", ".gif", ".npz", ".npy", ".zip", ".whl", ".gz", ".pdf")
NOT_PATHS = (".gitignore",)  # git patterns: a leading slash anchors them at the repository root


def absolute_paths(text: str) -> list[str]:
  """Absolute paths in `text` that are neither system locations nor argument values."""
  found = []
  for line in text.splitlines():
    for m in ABSOLUTE.finditer(line):
      path = m.group()
      system = any(path == s or path.startswith(s + "/") for s in SYSTEM)
      example = path.startswith(EXAMPLE) and ARGUMENT.search(line[:m.start()])
      if system or example:
        continue
      found.append(path)
  return found


def test_the_detector_catches_development_paths():
  # Built from pieces, so that this file itself holds none of them.
  bad = ["/" + "work/runs/fm_p7", "/" + "work/scratch/half_se.py", "/" + "tmp/qcache5/x",
         "/" + "work/.device/2", "/" + "home/me/quee", "/" + "workdir/x/", "/" + "contents/x"]
  for path in bad:
    for text in (path, f"`{path}`", f"see ({path}) and more", f'open("{path}")',
                 f"bench log: {path}", f"x={path}", f"python -m experiments.ceiling {path}",
                 f"--variant {path}"):
      assert absolute_paths(text) == [path], text
  # An argument's value is an example only in tmp or as a path/to placeholder.
  assert absolute_paths("--workdir /tmp/quee_fm and " + bad[2]) == [bad[2]]
  assert absolute_paths("--workdir " + bad[0]) == [bad[0]]
  assert absolute_paths("--config.data_dir=" + bad[4]) == [bad[4]]


def test_the_detector_allows_examples_and_system_locations():
  ok = ["python -m experiments.run --config experiments/configs/fashion_mnist.py --workdir /tmp/quee_fm",
        "--workdir=/tmp/x --config.init_from=/path/to/Ti_16.npz --config.data_dir=/path/to/tfds",
        "--data_dir /tmp/datasets", "#!/usr/bin/env bash", "`/usr/share/datasets/fashion-mnist`",
        "cd /content/quee_jax", "> /dev/null", "https://github.com/ORG/quee_jax/blob/main/x",
        "acc@1/16, 1 / 8", "~/.cache/quee_jax", "DIR/predictors/", "f\"{prefix}/scale\"",
        "cd \"$(dirname \"$0\")/..\"", "<variant>/seed_0", "a/b/c.py", "../method.md",
        "/usr/bin/python3", 'flat[b + "/scale"]', 'Path("/tmp")',
        "--workdirs /tmp/quee_fm,/tmp/quee_minilm"]
  for text in ok:
    assert absolute_paths(text) == [], text


def text_files() -> list[str]:
  try:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    pytest.skip("not a git checkout")
  files = []
  for name in sorted(set(out.splitlines())):
    path = os.path.join(ROOT, name)
    if (name.lower().endswith(BINARY) or os.path.basename(name) in NOT_PATHS
        or not os.path.isfile(path)):
      continue
    with open(path, "rb") as f:
      data = f.read()
    if b"\0" in data:
      continue
    files.append(name)
  return files


def test_no_absolute_path_of_a_development_machine():
  files = text_files()
  assert "README.md" in files and "tests/test_docs.py" in files
  found = []
  for name in files:
    with open(os.path.join(ROOT, name), encoding="utf-8", errors="replace") as f:
      for i, line in enumerate(f, 1):
        found += [f"{name}:{i}: {p}" for p in absolute_paths(line)]
  assert not found, "absolute paths (use --workdir DIR or a path in the repository):\n" + "\n".join(found)


# --- cited files exist -------------------------------------------------------------------

TOP = ("quee_jax", "experiments", "docs", "colab", "tests", ".ci")
# A repository path in prose, a command or a backticked span: quee_jax/gating/policy.py,
# experiments/configs/fashion_mnist.py(:demo), docs/results/, colab/api_tour.ipynb.
REPO_PATH = re.compile(r"(?<![\w./~$-])((?:%s)/[\w./-]*)" % "|".join(re.escape(t) for t in TOP))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def docs() -> dict[str, str]:
  """README.md, docs/**/*.md and the notebooks' markdown cells: name -> text."""
  out = {}
  for name in ["README.md", *sorted(glob.glob("docs/**/*.md", root_dir=ROOT, recursive=True))]:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
      out[name] = f.read()
  for name in sorted(glob.glob("colab/*.ipynb", root_dir=ROOT)):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
      cells = json.load(f)["cells"]
    out[name] = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
  return out


def cited_paths(name: str, text: str) -> list[tuple[str, str]]:
  """(as written, repository-relative path) of every repository path `text` cites."""
  cited = []
  for m in REPO_PATH.finditer(text):
    written = m.group(1).rstrip(".")  # a sentence's full stop
    cited.append((written, os.path.normpath(written)))
  for m in LINK.finditer(text):
    target = m.group(1).split("#")[0]
    if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target):  # an anchor, or a URL
      continue
    cited.append((target, os.path.normpath(os.path.join(os.path.dirname(name), target))))
  return cited


def test_cited_paths_are_found():
  assert ("experiments/configs/fashion_mnist.py", "experiments/configs/fashion_mnist.py") in \
      cited_paths("README.md", "`python -m experiments.run --config experiments/configs/fashion_mnist.py:demo`")
  assert cited_paths("docs/results/x.md", "[plot](x.png) [m](../method.md#cost) [w](https://a/b)") \
      == [("x.png", "docs/results/x.png"), ("../method.md", "docs/method.md")]
  assert [p for _, p in cited_paths("README.md", "`quee_jax/datasets/README.md`, `~/.cache/quee_jax`.")] \
      == ["quee_jax/datasets/README.md"]


def test_every_file_a_doc_cites_exists():
  missing = []
  for name, text in docs().items():
    for written, path in cited_paths(name, text):
      if path.startswith("..") or not os.path.exists(os.path.join(ROOT, path)):
        missing.append(f"{name}: {written}")
  assert not missing, "cited but not in the repository:\n" + "\n".join(missing)


# --- every result has its command --------------------------------------------------------

COMMAND = re.compile(r"python -m experiments\.\S+.*--workdir")


def sections(text: str) -> list[tuple[str, list[str]]]:
  """(heading, lines) from one markdown heading to the next (# lines in code blocks are not)."""
  out, heading, lines, fenced = [], "(top)", [], False
  for line in text.splitlines():
    if line.startswith("```"):
      fenced = not fenced
    if not fenced and re.match(r"^#{1,6} ", line):
      out.append((heading, lines))
      heading, lines = line, []
    else:
      lines.append(line)
  out.append((heading, lines))
  return out


def results_docs() -> list[str]:
  return sorted(glob.glob("docs/results/*.md", root_dir=ROOT))


def unreproducible(text: str) -> list[str]:
  """Headings of the sections that show a table or a figure without a command."""
  bad = []
  for heading, lines in sections(text):
    joined = "\n".join(lines).replace("\\\n", " ")  # continued command lines
    shows = any(l.lstrip().startswith("|") or "![" in l for l in lines)
    if shows and not any(COMMAND.search(l) for l in joined.splitlines()):
      bad.append(heading)
  return bad


def test_the_command_check_itself():
  table = "| a | b |\n|---|---|\n| 1 | 2 |\n"
  assert unreproducible(f"# A\n\n{table}") == ["# A"]
  assert unreproducible(f"# A\n\n```bash\n# not a heading\npython -m experiments.run \\\n"
                        f"    --config c.py --workdir /tmp/x\n```\n{table}\n## B\n\ntext\n") == []
  assert unreproducible("# A\n`python -m experiments.run --workdir /tmp/x`\n## B\n![p](p.png)\n") \
      == ["## B"]


def test_every_result_comes_with_its_command():
  assert {"fashion_mnist.md", "sentiment_minilm.md", "runtime.md", "gpu_numerics.md"} <= \
      {os.path.basename(n) for n in results_docs()}
  bad = []
  shown = set()
  for name in results_docs():
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
      text = f.read()
    bad += [f"{name}: {h}" for h in unreproducible(text)]
    shown |= {os.path.normpath(os.path.join("docs/results", t))
              for t in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)}
  assert not bad, "a table or figure without `python -m experiments.... --workdir DIR`:\n" + "\n".join(bad)
  figures = {os.path.join("docs/results", f) for f in os.listdir(os.path.join(ROOT, "docs/results"))
             if f.lower().endswith((".png", ".svg", ".jpg"))}
  assert figures and figures <= shown, f"figures no results page shows: {sorted(figures - shown)}"


# --- the README is a guide ---------------------------------------------------------------

def test_readme_is_short():
  with open(os.path.join(ROOT, "README.md"), "rb") as f:
    data = f.read()
  assert len(data) <= 15_000, f"README.md has {len(data):,} bytes"
  lines = data.count(b"\n")
  assert lines <= 250, f"README.md has {lines} lines"
