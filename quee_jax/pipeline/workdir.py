"""The work directory: what each stage wrote, and with which config values.

Every stage's output carries a stamp of the config values it depends on
(`stamps`); a stage whose output is there with the same stamp is skipped, and
one with another stamp is redone. JSON files are written to a temporary name
and renamed, so an interrupted write never leaves a file that reads.
"""

from __future__ import annotations

import json
import os
import shutil

import ml_collections

from quee_jax import protocol
from quee_jax.core import table
from quee_jax.pipeline.plan import Plan, make_plan
from quee_jax.protocol.storage import write_json


def _plain(value):
  """value as it reads back from JSON (tuples become lists), for comparisons."""
  return json.loads(json.dumps(value))


def made_with(path: str, key: str, value) -> bool:
  """Whether the JSON at path was written with config part `key` equal to value."""
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return json.load(f).get("config", {}).get(key) == _plain(value)


def stage_dir(workdir: str, name: str, config: dict) -> str:
  """workdir/name for checkpoints made with config; emptied if they were made with another."""
  path = os.path.join(workdir, name)
  stamp = os.path.join(path, "config.json")
  if os.path.isdir(path) and not made_with(stamp, name, config):
    shutil.rmtree(path)
  if not os.path.exists(stamp):
    os.makedirs(path, exist_ok=True)
    write_json(stamp, {"config": {name: config}}, indent=1)
  return path


def stamps(c: ml_collections.ConfigDict) -> dict:
  """The config values each stage's output depends on, as stored beside it."""
  backbone = _plain({"model": c.model.to_dict(), "backbone": c.backbone.to_dict(),
                     "init_from": c.init_from, "init_head": c.init_head, "dataset": c.dataset,
                     "seed": c.seed, "splits": c.splits.to_dict()})
  model = {**backbone, "exit_heads": c.exit_heads.to_dict(), "exit_heads_level": c.exit_heads_level}
  tables = _plain({"model": model, "ladder": c.ladder, "family": c.family,
                   "cost_unit": c.cost_unit, "summary_dim": c.collect.summary_dim})
  return {"backbone": backbone, "model": model, "tables": tables,
          "eval": _plain({"tables": tables, "eval": c.eval.to_dict(),
                          "results_version": protocol.RESULTS_VERSION})}


def load_finished(workdir: str) -> tuple[ml_collections.ConfigDict, Plan, dict]:
  """(config, plan, {split: state table}) of a work directory this pipeline finished, for the
  scripts that read one; ValueError naming `workdir` if it is not finished."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"workdir: no config.json in {workdir!r}; run experiments.run into it first")
  with open(path) as f:
    c = ml_collections.ConfigDict(json.load(f))
  plan = make_plan(c)
  st = stamps(c)
  for name, key in (("accuracy.json", "model"), ("results.json", "eval")):
    if not made_with(os.path.join(workdir, name), key, st[key]):
      raise ValueError(f"workdir: {name} in {workdir!r} is missing or from another config;"
                       " finish `python -m experiments.run` with this config first")
  tables = {k: table.load_table(os.path.join(workdir, "tables", k)) for k in ("fit", "cal", "test")}
  return c, plan, tables
