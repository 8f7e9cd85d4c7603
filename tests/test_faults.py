"""Faults a pipeline run meets, and the one message each now gives: a busy work directory,
damaged outputs (recomputed, the file named), a changed ladder, empty splits, relative work
directories, a missing config file, a work directory that is a file, damaged IDX files."""

import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from test_experiments import ROOT, get_config, shrink

from quee_jax import pipeline as run_lib
from quee_jax.data import sources

TESTS = os.path.dirname(os.path.abspath(__file__))


def tiny():
  """The demo config on the embedded data, shrunk to run every stage in seconds."""
  return shrink(get_config("fashion_mnist", "demo"), patch=7)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A work directory the tiny pipeline finished (copy it before changing anything)."""
  workdir = tmp_path_factory.mktemp("finished") / "wd"
  run_lib.run(tiny(), str(workdir))
  return workdir


@pytest.fixture
def wd(finished, tmp_path):
  """A private copy of the finished work directory."""
  shutil.copytree(finished, tmp_path / "wd")
  return tmp_path / "wd"


# The first run of the concurrent pair: the tiny config with another seed, so it evaluates.
FIRST_RUN = f"""
import sys
sys.path[:0] = [{TESTS!r}, {os.path.abspath(ROOT)!r}]
from test_faults import tiny
from quee_jax import pipeline
c = tiny()
c.eval.seeds = (1,)
pipeline.run(c, sys.argv[1])
"""


def test_a_second_run_on_a_busy_workdir_is_refused(wd):
  first = subprocess.Popen([sys.executable, "-c", FIRST_RUN, str(wd)], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  t0 = time.time()
  while not (wd / ".lock").read_text():  # the finished run left it empty
    assert first.poll() is None and time.time() - t0 < 120, first.communicate()[1][-3000:]
    time.sleep(0.02)
  holder = json.loads((wd / ".lock").read_text())
  assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
  busy = (f"workdir: '{wd}' is in use by another run (pid {first.pid} on host"
          f" {socket.gethostname()}, started {holder['started']}); wait for it to finish or"
          " give another --workdir")
  with pytest.raises(ValueError) as e:
    run_lib.run(tiny(), str(wd))
  assert str(e.value) == busy
  with pytest.raises(ValueError) as e:  # the scripts that read a finished directory wait too
    run_lib.load_finished(str(wd))
  assert str(e.value) == busy
  out, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-3000:]
  results = json.load(open(wd / "results.json"))  # the first run's, whole
  assert results["seeds"] == [1] and (wd / ".lock").read_text() == ""
  _, plan, _ = run_lib.load_finished(str(wd))  # and readable now that it is done
  assert plan.eval.seeds == (1,)


def _garbage(path):
  path.write_bytes(b"garbage")


def _truncate(path):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("name,damage,unseal,notice", [
    ("tables/test/arrays.npz", _truncate, False,
     "{path} is damaged (its content differs from the checksum in meta.json); collecting the"
     " test table again"),
    ("tables/fit/meta.json", _garbage, False,
     "{path} is damaged (Expecting value: line 1 column 1 (char 0)); collecting the fit table"
     " again"),
    ("results.json", _garbage, False,
     "{path} is damaged (its content differs from its checksum); not using it"),
    ("results.json", _garbage, True,  # a work directory from before the checksums
     "{path} is damaged (Expecting value: line 1 column 1 (char 0)); not using it"),
    ("accuracy.json", _garbage, False,
     "{path} is damaged (its content differs from its checksum); not using it"),
    ("predictors/quee/seed_0.json", _garbage, False,
     "{path} is damaged (Expecting value: line 1 column 1 (char 0)); fitting this run again"),
])
def test_a_damaged_output_is_recomputed_and_named(wd, name, damage, unseal, notice, capsys):
  def outputs():  # what must come back the same (accuracy.json also holds wall times)
    return (wd / "results.json").read_bytes(), json.load(open(wd / "accuracy.json"))["test_accuracy"]
  want = outputs()
  path = wd / name
  damage(path)
  if unseal:
    os.remove(f"{path}.sha256")
  if name.startswith("predictors"):  # a saved run is read only while evaluating
    os.remove(wd / "results.json")
  run_lib.run(tiny(), str(wd))
  out = capsys.readouterr().out
  assert f"notice: {notice.format(path=path)}\n" in out
  assert outputs() == want  # recomputed as it was
  if name.startswith("tables"):
    split = name.split("/")[1]
    assert f"tables: {split} collected in" in out and out.count("collected in") == 1
  assert "Traceback" not in out


def test_a_checkpoint_that_does_not_restore_is_trained_again(wd, capfd):
  want = json.load(open(wd / "accuracy.json"))["test_accuracy"]
  for root, _, files in os.walk(wd / "exit_heads" / "1" / "default"):
    for f in files:
      if not f.startswith(("_", "commit")) and "metadata" not in root:
        _garbage(wd / root / f)
  os.remove(wd / "accuracy.json")  # so that the trained heads are needed
  run_lib.run(tiny(), str(wd), stages=("exit_heads",))
  out, err = capfd.readouterr()
  line = next(l for l in out.splitlines() if l.startswith("notice:"))
  assert line.startswith(f"notice: the checkpoint in {wd}/exit_heads does not restore (")
  assert line.endswith("); training this stage from scratch")
  assert "Traceback" not in out + err
  assert json.load(open(wd / "accuracy.json"))["test_accuracy"] == want


def test_a_changed_ladder_collects_the_tables_again(wd, capsys):
  c = tiny()
  c.ladder = "float,w8a8,w4a4"
  run_lib.run(c, str(wd))
  out = capsys.readouterr().out
  assert f"notice: {wd}/accuracy.json was measured with another ladder; measuring it again\n" in out
  for split in ("fit", "cal", "test"):
    assert (f"notice: {wd}/tables/{split} was collected with another ladder; collecting the"
            f" {split} table again\n") in out
  results = json.load(open(wd / "results.json"))
  assert results["ladder"] == ["float", "w8a8", "w4a4"]
  assert set(json.load(open(wd / "accuracy.json"))["test_accuracy"]) == {"float", "w8a8", "w4a4"}


@pytest.mark.parametrize("split", ["train", "fit", "cal", "test"])
def test_an_empty_split_is_refused_before_any_work(split, tmp_path):
  c = tiny()
  c.splits[split] = 0
  with pytest.raises(ValueError) as e:
    run_lib.run(c, str(tmp_path / "wd"))
  assert str(e.value) == (f"--config.splits.{split}: expected a positive size (or None for the"
                          " dataset's default), got 0")
  assert not (tmp_path / "wd").exists()


def test_relative_workdirs_progress_and_a_stale_lock(wd, monkeypatch, capsys):
  monkeypatch.chdir(wd.parent)
  os.remove(wd / "accuracy.json")  # the trained params are restored from orbax checkpoints
  run_lib.run(tiny(), "wd")
  capsys.readouterr()
  (wd / ".lock").write_text('{"pid": 999999, "host": "gone", "started": "2026-01-01T00:00:00+00:00"}')
  run_lib.run(tiny(), "wd")
  out = capsys.readouterr().out
  assert (f"notice: {wd}/.lock was left by pid 999999 on host gone (started"
          " 2026-01-01T00:00:00+00:00), which no longer holds it: a stale lock, taken over\n") in out
  lines = [l.split("] ", 1)[-1] for l in out.splitlines()]
  assert ("pipeline: fashion_mnist_embedded (train 64, fit 32, cal 32, test 32); vit patch 7"
          " depth 2 width 16; ladder float,w8a8,w4a4,w2a4; family switch_once; seeds 0") in lines
  assert f"  work directory {wd} (data loaded in" in out
  for stage in ("backbone", "exit_heads", "tables", "evaluate"):
    assert f"{stage}: skipped (done)" in lines
  # The scripts that read a finished directory take a relative one as well.
  c, plan, tables = run_lib.load_finished("wd")
  splits = run_lib.config_splits(c, plan)
  assert run_lib.trained_params(c, plan, splits, "wd", {}) is not None
  assert tables["test"].num_samples == 32


def _cli(*args):
  out = subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  return out.stderr.strip().splitlines()


def test_a_missing_config_file_is_one_line(tmp_path):
  lines = _cli("--config", "nowhere.py:demo", "--workdir", str(tmp_path / "wd"))
  assert lines == ["error: --config: cannot load 'nowhere.py': [Errno 2] No such file or"
                   " directory: 'nowhere.py'"]
  assert not (tmp_path / "wd").exists()


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
  path = tmp_path / "file"
  path.write_text("mine")
  with pytest.raises(ValueError) as e:
    run_lib.run(tiny(), str(path))
  assert str(e.value) == f"workdir: '{path}' is a file, not a directory"
  assert path.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_workdir_is_refused(tmp_path):
  (tmp_path / "ro").mkdir(mode=0o500)
  with pytest.raises(ValueError) as e:
    run_lib.run(tiny(), str(tmp_path / "ro"))
  assert str(e.value) == f"workdir: cannot write to '{tmp_path / 'ro'}' (permission denied)"


def test_damaged_idx_files_are_named_and_a_failed_run_keeps_config_json(wd, tmp_path):
  truncated, plain = tmp_path / "train-images-idx3-ubyte.gz", tmp_path / "t.gz"
  truncated.write_bytes(gzip.compress(bytes(4 + 12 + 28 * 28))[:20])
  plain.write_bytes(b"garbage")
  with pytest.raises(ValueError) as e:
    sources.read_idx(str(truncated))
  assert str(e.value) == (f"path: '{truncated}' is truncated (Compressed file ended before the"
                          " end-of-stream marker was reached); fetch the IDX file again")
  with pytest.raises(ValueError) as e:
    sources.read_idx(str(plain))
  assert str(e.value) == (f"path: '{plain}' is not readable (Not a gzipped file (b'ga'));"
                          " fetch the IDX file again")
  # A run that fails on its data leaves the finished directory as it was.
  config = (wd / "config.json").read_bytes()
  c = tiny()
  c.update(dataset="fashion_mnist", source="idx", data_dir=str(tmp_path))
  with pytest.raises(ValueError) as e:
    run_lib.run(c, str(wd))
  assert str(e.value).startswith(f"path: '{truncated}' is truncated")
  assert (wd / "config.json").read_bytes() == config
