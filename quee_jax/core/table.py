"""State tables: what every state of a path family does on every sample.

Saved as a directory with `arrays.npz` (the arrays) and `meta.json` (family
spec, ladder, backbone config, extras, and the checksum of arrays.npz); written
to temporary names and renamed, so an interrupted save never leaves a table that
loads, and a damaged one fails to load with a ValueError naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile

import numpy as np

from quee_jax.core import paths
from quee_jax.core.exit_stats import FEATURES
from quee_jax.core.paths import PathFamily
from quee_jax.core.progress import first_line

FORMAT_VERSION = 1
_FAMILY_ARRAYS = ("gate", "parent", "level", "history", "cost", "cand_state", "cand_cost")


@dataclasses.dataclass(eq=False)
class StateTable:
  """Per state s and sample n: prediction, correctness and softmax features.

  Attributes:
    family: the path family whose states index the first axis.
    labels: [N] int32 true labels.
    pred: [S, N] int32 predicted class of the state's exit.
    correct: [S, N] bool.
    features: name -> [S, N] float32, names in FEATURES.
    logits: [S, N, C] float32 or None.
    summary: [S, N, k] float32 projection of each state's exit summary, or None.
    backbone: the backbone's config.
    meta: extra metadata (dataset, split, ...).
  """

  family: PathFamily
  labels: np.ndarray
  pred: np.ndarray
  correct: np.ndarray
  features: dict[str, np.ndarray]
  logits: np.ndarray | None
  backbone: dict
  meta: dict
  summary: np.ndarray | None = None

  @property
  def num_states(self) -> int:
    return self.pred.shape[0]

  @property
  def num_samples(self) -> int:
    return self.pred.shape[1]

  def accuracy(self) -> np.ndarray:
    """[S] accuracy of every state's exit."""
    return self.correct.mean(axis=1)

  def restrict(self, family: PathFamily) -> "StateTable":
    """The table of `family`, whose histories must all be states of this table.

    E.g. exit_only and constant tables from a switch_once table, without
    collecting again; also re-costs states when `family` has other costs.
    """
    idx = self.family.rows_of(family)
    take = lambda a: None if a is None else a[idx]
    return StateTable(family=family, labels=self.labels, pred=self.pred[idx],
                      correct=self.correct[idx],
                      features={k: v[idx] for k, v in self.features.items()},
                      logits=take(self.logits), backbone=self.backbone, meta=self.meta,
                      summary=take(self.summary))


def _check_dir(path: str) -> None:
  for name in ("arrays.npz", "meta.json"):
    if not os.path.exists(os.path.join(path, name)):
      raise ValueError(f"path: {path!r} holds no state table (missing {name})")


def file_sha256(path: str) -> str:
  """The SHA-256 of a file's content (hex): the checksum saved outputs are sealed with."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def save_table(table: StateTable, path: str) -> None:
  """Writes `table` to the directory `path` (created if needed)."""
  os.makedirs(path, exist_ok=True)
  arrays = {"labels": table.labels, "pred": table.pred, "correct": table.correct,
            **{f"feature/{k}": v for k, v in table.features.items()},
            **{f"family/{k}": getattr(table.family, k) for k in _FAMILY_ARRAYS}}
  for name in ("logits", "summary"):
    if getattr(table, name) is not None:
      arrays[name] = getattr(table, name)
  meta = {"format_version": FORMAT_VERSION, "family": table.family.spec(),
          "ladder": list(table.family.ladder), "backbone": table.backbone, "meta": table.meta,
          "num_states": table.num_states, "num_samples": table.num_samples}
  for name, write in (("arrays.npz", lambda f: np.savez_compressed(f, **arrays)),
                      ("meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))):
    fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{name}.")
    with os.fdopen(fd, "wb") as f:
      write(f)
    if name == "arrays.npz":  # meta.json, written last, vouches for the arrays
      meta["arrays_sha256"] = file_sha256(tmp)
    os.replace(tmp, os.path.join(path, name))


def load_table(path: str, *, ladder: list[str] | tuple[str, ...] | None = None,
               family: str | None = None) -> StateTable:
  """Reads a table saved by `save_table`.

  Args:
    path: the table's directory.
    ladder: if given, the level names the table must have been collected with.
    family: if given, the family name it must have been collected with.
  """
  _check_dir(path)
  meta_path, arrays_path = os.path.join(path, "meta.json"), os.path.join(path, "arrays.npz")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    if (not isinstance(meta, dict) or not isinstance(meta.get("family"), dict)
        or not {"backbone", "meta"} <= set(meta) or not {"ladder", "name"} <= set(meta["family"])):
      raise ValueError("not a table's meta.json")
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise ValueError(f"path: {meta_path} is damaged ({first_line(e)})") from None
  if meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"path: table format {meta.get('format_version')} at {path!r},"
                     f" this version reads {FORMAT_VERSION}")
  spec = meta["family"]
  if ladder is not None and [str(q) for q in ladder] != spec["ladder"]:
    raise ValueError(f"ladder: the table at {path!r} was collected with ladder"
                     f" {spec['ladder']}, not {[str(q) for q in ladder]}")
  if family is not None and family != spec["name"]:
    raise ValueError(f"family: the table at {path!r} was collected with family"
                     f" {spec['name']!r}, not {family!r}")
  if "arrays_sha256" in meta and file_sha256(arrays_path) != meta["arrays_sha256"]:
    raise ValueError(f"path: {arrays_path} is damaged (its content differs from the checksum"
                     " in meta.json)")
  try:
    fam = paths.from_spec(spec)
  except Exception as e:  # a spec that parses but says nothing sensible
    raise ValueError(f"path: {meta_path} is damaged ({first_line(e)})") from None
  try:
    with np.load(arrays_path) as z:
      arrays = {k: z[k] for k in z.files}
    missing = [k for k in ("labels", "pred", "correct", *(f"family/{a}" for a in _FAMILY_ARRAYS),
                           *(f"feature/{f}" for f in FEATURES)) if k not in arrays]
    if missing:
      raise ValueError(f"no {missing[0]!r}")
  except Exception as e:  # zipfile, zlib and numpy raise many types for a damaged file
    raise ValueError(f"path: {arrays_path} is damaged ({first_line(e)})") from None
  for k in _FAMILY_ARRAYS:
    if not np.array_equal(arrays[f"family/{k}"], getattr(fam, k)):
      raise ValueError(f"path: the table at {path!r} disagrees with its family spec on {k!r}"
                       " (written by another version of quee_jax?)")
  return StateTable(
      family=fam, labels=arrays["labels"], pred=arrays["pred"], correct=arrays["correct"],
      features={k: arrays[f"feature/{k}"] for k in FEATURES}, logits=arrays.get("logits"),
      backbone=meta["backbone"], meta=meta["meta"], summary=arrays.get("summary"))
