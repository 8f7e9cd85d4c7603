"""The work directory: what each stage wrote, and with which config values.

Every stage's output carries a stamp of the config values it depends on
(`stamps`); a stage whose output is there with the same stamp is skipped, and
one with another stamp is redone. JSON files are written to a temporary name
and renamed, so an interrupted write never leaves a file that reads; a JSON
output also gets a content checksum beside it (`<name>.sha256`, `write_sealed`),
so one damaged later is recomputed, not used. A run holds an exclusive lock on
its work directory (`lock`, DIR/.lock); readers of a finished one refuse while
a run holds it (`load_finished`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shutil
import socket

import ml_collections

from quee_jax import protocol
from quee_jax.core import hosts, precision, table
from quee_jax.core.progress import first_line, notice
from quee_jax.pipeline.plan import Plan, make_plan, quant_backend
from quee_jax.protocol.storage import write_json


def _plain(value):
  """value as it reads back from JSON (tuples become lists), for comparisons."""
  return json.loads(json.dumps(value))


LOCK = ".lock"


def write_sealed(path: str, obj, indent: int | None = None) -> None:
  """write_json, then the content's checksum beside it (path + '.sha256').

  The old checksum goes first: a run killed in between leaves none, and a file without
  one is trusted if it parses (as in work directories written before checksums).
  Under several processes the writer writes and every process returns once it is there
  (every process must call it).
  """
  if hosts.is_writer():
    _write_sealed(path, obj, indent)
  hosts.barrier(f"write {os.path.basename(path)}")


def _write_sealed(path: str, obj, indent: int | None) -> None:
  seal = path + ".sha256"
  if os.path.exists(seal):
    os.remove(seal)
  write_json(path, obj, indent=indent)
  with open(seal + ".tmp", "w") as f:
    f.write(table.file_sha256(path))
  os.replace(seal + ".tmp", seal)


def read_json(path: str, *, quiet: bool = False) -> dict | None:
  """The JSON object at path; None if it is missing or damaged (with a notice naming it)."""
  if not os.path.exists(path):
    return None
  why = None
  seal = path + ".sha256"
  try:
    if os.path.exists(seal):
      with open(seal) as f:
        if f.read().strip() != table.file_sha256(path):
          why = "its content differs from its checksum"
    if why is None:
      with open(path) as f:
        obj = json.load(f)
      if not isinstance(obj, dict):
        why = "not a JSON object"
  except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
    why = first_line(e)
  if why is None:
    return obj
  if not quiet:
    notice(f"{path} is damaged ({why}); not using it")
  return None


def made_with(path: str, key: str, value, *, quiet: bool = False) -> bool:
  """Whether the JSON at path was written with config part `key` equal to value (False if it
  is missing or damaged; a damaged one is named in a notice unless quiet)."""
  obj = read_json(path, quiet=quiet)
  if obj is None:
    return False
  stamp = obj.get("config")
  return isinstance(stamp, dict) and stamp.get(key) == _plain(value)


def _holder(path: str) -> dict:
  """What the lock file at path says about its holder ({} if nothing readable)."""
  try:
    with open(path) as f:
      holder = json.loads(f.read() or "{}")
    return holder if isinstance(holder, dict) else {}
  except (OSError, ValueError):
    return {}


def _in_use(workdir: str, holder: dict) -> ValueError:
  return ValueError(
      f"workdir: {workdir!r} is in use by another run (pid {holder.get('pid', '?')} on host"
      f" {holder.get('host', '?')}, started {holder.get('started', '?')}); wait for it to"
      " finish or give another --workdir")


def _open_dir(workdir: str) -> None:
  """Creates workdir; ValueError naming it when it cannot be a work directory."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except FileExistsError:
    raise ValueError(f"workdir: {workdir!r} is a file, not a directory") from None
  except NotADirectoryError:
    raise ValueError(f"workdir: a part of {workdir!r} is a file, not a directory") from None
  except PermissionError:
    raise ValueError(f"workdir: cannot create {workdir!r} (permission denied)") from None
  if not os.path.isdir(workdir):
    raise ValueError(f"workdir: {workdir!r} is a file, not a directory")
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise ValueError(f"workdir: cannot write to {workdir!r} (permission denied)")


@contextlib.contextmanager
def lock(workdir: str):
  """Holds an exclusive lock on workdir (created if needed) for the with-block.

  Under several processes the writer holds it and the others wait until it does (a
  refused writer stops, and with it the others: `hosts`).

  The lock is a flock on DIR/.lock, which names its holder (pid, host, start time). The
  kernel drops a flock when its process dies, so a lock file left by a killed run is no
  lock: it is taken over (with a notice). ValueError naming the holder if one is alive.
  """
  workdir = os.path.abspath(workdir)
  with _locked(workdir) if hosts.is_writer() else contextlib.nullcontext():
    hosts.barrier("lock")  # the others go on once the writer holds it
    yield workdir


@contextlib.contextmanager
def _locked(workdir: str):
  _open_dir(workdir)
  path = os.path.join(workdir, LOCK)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise ValueError(f"workdir: cannot create the lock file {path!r} ({e.strerror})") from None
  try:
    _flock(fd, fcntl.LOCK_EX, workdir, path)
    old = _holder(path)
    if old:  # a holder unlocks by emptying the file: this one died holding it
      notice(f"{path} was left by pid {old.get('pid', '?')} on host {old.get('host', '?')}"
             f" (started {old.get('started', '?')}), which no longer holds it: a stale lock,"
             " taken over")
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    try:
      yield workdir
    finally:
      os.ftruncate(fd, 0)  # the file stays (unlinking a flocked file races a new holder)
  finally:
    os.close(fd)  # closing drops the flock


def _flock(fd: int, mode: int, workdir: str, path: str) -> None:
  """Takes the lock in `mode` without waiting; ValueError naming the holder if a run has it."""
  try:
    fcntl.flock(fd, mode | fcntl.LOCK_NB)
  except OSError as e:
    if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
      raise
    raise _in_use(workdir, _holder(path)) from None


def check_unlocked(workdir: str) -> None:
  """ValueError naming the holder if a run holds workdir's lock (a reader must not read a
  directory being written)."""
  path = os.path.join(workdir, LOCK)
  if not os.path.exists(path):
    return
  fd = os.open(path, os.O_RDONLY)
  try:
    _flock(fd, fcntl.LOCK_SH, workdir, path)
  finally:
    os.close(fd)


def stage_dir(workdir: str, name: str, config: dict) -> str:
  """workdir/name for checkpoints made with config; emptied if they were made with another
  (or if their stamp is damaged)."""
  path = os.path.join(os.path.abspath(workdir), name)
  stamp = os.path.join(path, "config.json")
  if hosts.is_writer():
    if os.path.isdir(path) and not made_with(stamp, name, config):
      shutil.rmtree(path)
    if not os.path.exists(stamp):
      os.makedirs(path, exist_ok=True)
      write_json(stamp, {"config": {name: config}}, indent=1)
  hosts.barrier(f"stage_dir {name}")  # the others find it ready
  return path


def stamps(c: ml_collections.ConfigDict) -> dict:
  """The config values each stage's output depends on, as stored beside it."""
  backbone = _plain({"model": c.model.to_dict(), "backbone": c.backbone.to_dict(),
                     "init_from": c.init_from, "init_head": c.init_head, "dataset": c.dataset,
                     "seed": c.seed, "splits": c.splits.to_dict()})
  model = {**backbone, "exit_heads": c.exit_heads.to_dict(), "exit_heads_level": c.exit_heads_level}
  tables = {"model": model, "ladder": c.ladder, "family": c.family, "cost_unit": c.cost_unit,
            "summary_dim": c.collect.summary_dim}
  backend = quant_backend(c)
  if backend != precision.DEFAULT_BACKEND:
    # What runs quantized levels depends on the backend: the tables (and all after them),
    # and the exit heads when they are trained on quantized features. Named only when it is
    # not the default, so that work directories made before there was a choice keep their
    # stamps and are not recomputed.
    tables["quant_backend"] = backend
    if not precision.parse_level(c.exit_heads_level).is_float:
      model["quant_backend"] = backend
  tables = _plain(tables)
  return {"backbone": backbone, "model": model, "tables": tables,
          "eval": _plain({"tables": tables, "eval": c.eval.to_dict(),
                          "results_version": protocol.RESULTS_VERSION})}


def load_finished(workdir: str) -> tuple[ml_collections.ConfigDict, Plan, dict]:
  """(config, plan, {split: state table}) of a work directory this pipeline finished, for the
  scripts that read one; ValueError naming `workdir` (or the damaged file) if it is not
  finished, or while a run holds it."""
  workdir = os.path.abspath(workdir)
  check_unlocked(workdir)
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"workdir: no config.json in {workdir!r}; run experiments.run into it first")
  config = read_json(path, quiet=True)
  if config is None:
    raise ValueError(f"workdir: {path} is damaged; run experiments.run into {workdir!r} again")
  c = ml_collections.ConfigDict(config)
  plan = make_plan(c)
  st = stamps(c)
  for name, key in (("accuracy.json", "model"), ("results.json", "eval")):
    if not made_with(os.path.join(workdir, name), key, st[key], quiet=True):
      raise ValueError(f"workdir: {name} in {workdir!r} is missing, damaged or from another"
                       " config; finish `python -m experiments.run` with this config first")
  tables = {}
  for k in ("fit", "cal", "test"):
    try:
      tables[k] = table.load_table(os.path.join(workdir, "tables", k))
    except ValueError as e:
      raise ValueError(f"workdir: {str(e).removeprefix('path: ')}; finish"
                       " `python -m experiments.run` with this config first") from None
  return c, plan, tables
