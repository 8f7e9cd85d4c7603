"""Several processes on this machine: JAX's multi-controller runtime over the loopback
address, each process with 2 virtual CPU devices (what a multi-host slice runs, small)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import kill_when, pipeline_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One process of a run: collects the state table of a tiny ViT and trains its backbone
# (checkpoints in a directory all processes share), then saves both from process 0.
WORKER = textwrap.dedent("""
    import faulthandler, os, sys, numpy as np, jax
    faulthandler.dump_traceback_later(200)  # a hang shows where it is in the test's report
    out, ckpt = sys.argv[1:3]
    from quee_jax.core import hosts
    if "OMPI_COMM_WORLD_SIZE" in os.environ:  # JAX finds the others, as under mpirun
      hosts.initialize(heartbeat_timeout_s=20)
    import quee_jax as q
    from quee_jax import data, train
    cfg = q.vit.ViTConfig(image_size=28, channels=1, patch=7, dim=16, depth=2, heads=2,
                          mlp_dim=32, num_classes=10)
    splits = data.load_splits("fashion_mnist_embedded")
    params = q.vit.init(jax.random.key(0), cfg)
    bb = q.vit.backbone(cfg)
    ladder = q.parse_ladder("float,w4a4")
    family = q.build_family("switch_once", ladder, bb.exits,
                            q.backbone_costs(bb, params, splits.fit.images[:1], ladder))
    table = q.collect_table(bb, params, family, splits.fit.images[:200],
                            splits.fit.labels[:200], batch_size=56, progress=False)
    tc = train.TrainConfig(epochs=0.2, batch_size=32, checkpoint_every=2, drop_path=0.1,
                           mixup=0.2)
    trained = hosts.to_host(train.train_backbone(cfg, splits.cal, tc, ckpt, params=params))
    if hosts.is_writer():
      leaves = jax.tree_util.tree_flatten_with_path(trained)[0]
      np.savez(out, pred=table.pred, max_prob=table.features["max_prob"],
               summary=table.summary,
               **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})
    hosts.barrier("saved")
    print("devices", jax.device_count(), "processes", jax.process_count())
""")


def free_port(lowest: int = 0) -> int:
  """A port nobody listens on (the system's choice, or the first from `lowest` up)."""
  for port in ([0] if lowest == 0 else range(lowest, 65536)):
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", port))
      except OSError:
        continue
      return s.getsockname()[1]
  raise RuntimeError(f"no free port from {lowest}")


def start(argv: list[str], processes: int, devices: int, env: dict | None = None,
          **kwargs) -> list[subprocess.Popen]:
  """`processes` processes of one run of `argv`, each with `devices` CPU devices, in their
  own session (a test can kill one); "{i}" in argv and env becomes the process index."""
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         **(env or {})}
  each = lambda i: {k: v.replace("{i}", str(i)) for k, v in env.items()}
  return [subprocess.Popen([a.replace("{i}", str(i)) for a in argv], cwd=ROOT, env=each(i),
                           text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           start_new_session=True, **kwargs) for i in range(processes)]


def mpirun_env(processes: int) -> dict:
  """What Open MPI's mpirun tells each process (JAX's cluster detection reads it): process 0
  listens on the port JAX derives from the job id."""
  port = free_port(lowest=65536 - 4096)
  job = (port - (65536 - 4096)) * 4096
  return {"OMPI_MCA_orte_hnp_uri": f"{job}.0;tcp://127.0.0.1:1", "OMPI_COMM_WORLD_SIZE":
          str(processes), "OMPI_COMM_WORLD_RANK": "{i}", "OMPI_COMM_WORLD_LOCAL_RANK": "{i}"}


def finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str, str]]:
  """(returncode, stdout, stderr) of each; every process is killed past `timeout`."""
  deadline, results = time.time() + timeout, []
  for p in procs:
    try:
      out, err = p.communicate(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
      for q in procs:
        if q.poll() is None:
          os.killpg(q.pid, 9)
      pytest.fail(f"processes still running after {timeout} s")
    results.append((p.returncode, out, err))
  return results


def worker(tmp_path, name: str, processes: int, devices: int):
  argv = [sys.executable, "-c", WORKER, str(tmp_path / f"{name}.npz"), str(tmp_path / name)]
  env = mpirun_env(processes) if processes > 1 else None
  for code, out, err in finish(start(argv, processes, devices, env), timeout=240):
    assert code == 0, err[-3000:]
  assert f"devices {processes * devices} processes {processes}" in out
  return np.load(tmp_path / f"{name}.npz")


def test_two_processes_collect_and_train_as_one(tmp_path):
  one = worker(tmp_path, "one", processes=1, devices=4)
  two = worker(tmp_path, "two", processes=2, devices=2)
  # The same 4 devices, the same rows on each: the tables are bit-identical.
  for k in ("pred", "max_prob", "summary"):
    np.testing.assert_array_equal(one[k], two[k], err_msg=k)
  # Training: the gradients are summed across processes in another order than across one
  # process's devices; Adam divides by the root of tiny second moments, so that rounding
  # grows to ~1e-4 in 9 steps (7.8e-5 here), where a step moves a parameter by up to the
  # learning rate, 1e-3.
  params = [k for k in one.files if k.startswith("[")]
  assert len(params) > 20
  worst = max(float(np.abs(one[k] - two[k]).max()) for k in params)
  print(f"parameters, 2 processes x 2 devices vs 1 x 4: max |difference| {worst:.2g}")
  assert worst < 2.5e-4, worst
  # (One process resuming from the two's checkpoints: the slow pipeline test below.)


def test_multihost_settings_are_checked():
  from quee_jax.core import hosts
  for args, key in ((("127.0.0.1:1", None, None), "num_processes"),
                    (("localhost", 2, 0), "coordinator"),
                    (("127.0.0.1:1", 2, 2), "process_id"),
                    (("127.0.0.1:1", 0, 0), "num_processes")):
    with pytest.raises(ValueError, match=f"^{key}: "):
      hosts.initialize(*args)
  with pytest.raises(ValueError, match="^heartbeat_timeout: "):
    hosts.initialize("127.0.0.1:1", 2, 0, heartbeat_timeout_s=0)
  # The entry point names the flag, in one line, before any work.
  out = subprocess.run([sys.executable, "-m", "experiments.run", "--config",
                        "experiments/configs/fashion_mnist.py:demo", "--workdir", "/nonexistent",
                        "--coordinator=127.0.0.1:1", "--num_processes=2", "--process_id=2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and "error: --process_id: expected in [0, 2)" in out.stderr, \
      out.stderr[-2000:]


# The tiny demo pipeline; batches that split over 4 devices; a cal split of 9 batches, long
# enough for the test to kill a process while it is being collected.
TINY = pipeline_flags({"splits.cal": 2000, "backbone.batch_size": 52,
                       "exit_heads.batch_size": 52, "collect.batch_size": 248})


def pipeline(workdir, processes: int, devices: int) -> list[subprocess.Popen]:
  argv = [sys.executable, "-m", "experiments.run", "--config",
          "experiments/configs/fashion_mnist.py:demo", "--workdir", str(workdir), *TINY]
  if processes > 1:
    argv += [f"--coordinator=127.0.0.1:{free_port()}", f"--num_processes={processes}",
             "--process_id={i}", "--heartbeat_timeout=10"]
  return start(argv, processes, devices)


def same_tables(a, b) -> None:
  from quee_jax.core.table import load_table
  for split in ("fit", "cal", "test"):
    ta, tb = load_table(str(a / "tables" / split)), load_table(str(b / "tables" / split))
    np.testing.assert_array_equal(ta.pred, tb.pred, err_msg=split)
    np.testing.assert_array_equal(ta.summary, tb.summary, err_msg=split)
    for k in ta.features:
      np.testing.assert_array_equal(ta.features[k], tb.features[k], err_msg=f"{split} {k}")


def results(workdir) -> dict:
  return json.load(open(workdir / "results.json"))


def copy(src, dst, parts) -> None:
  dst.mkdir()
  for part in parts:
    (shutil.copytree if (src / part).is_dir() else shutil.copy)(src / part, dst / part)


@pytest.mark.slow
def test_pipeline_over_two_processes_resumes_anywhere(tmp_path):
  multi = tmp_path / "multi"
  for code, _, err in finish(pipeline(multi, 2, 2), timeout=900):
    assert code == 0, err[-3000:]
  # One process with the same 4 devices resumes from the two processes' checkpoints
  # (nothing left to train) and collects and evaluates exactly what they did.
  single = tmp_path / "single"
  copy(multi, single, ["backbone", "exit_heads"])
  [(code, _, err)] = finish(pipeline(single, 1, 4), timeout=900)
  assert code == 0 and "backbone: resuming at step 9 of 9" in err, err[-3000:]
  same_tables(multi, single)
  assert results(single) == results(multi)
  acc = lambda d: json.load(open(d / "accuracy.json"))["test_accuracy"]
  assert acc(single) == acc(multi)
  # With one device (the default on a CPU) each device computes 4x the rows: the same
  # predictions, features that differ in the last bits here and there.
  one = tmp_path / "one_device"
  copy(multi, one, ["backbone", "exit_heads"])
  [(code, _, err)] = finish(pipeline(one, 1, 1), timeout=900)
  assert code == 0, err[-3000:]
  from quee_jax.core.table import load_table
  differ = total = 0
  for split in ("fit", "cal", "test"):
    a, b = load_table(str(multi / "tables" / split)), load_table(str(one / "tables" / split))
    np.testing.assert_array_equal(a.pred, b.pred)
    differ += sum(int((a.features[k] != b.features[k]).sum()) for k in a.features)
    total += sum(a.features[k].size for k in a.features)
  print(f"one device: same predictions; {differ} of {total} feature values differ"
        f" (max_prob, margin, entropy, kl_parent, agree_parent); results.json"
        f" {'equal' if results(one) == results(multi) else 'differs'}")
  # A process killed mid-collection stops the other with JAX's error, within the
  # heartbeat timeout; the same command on both resumes, keeping the finished split.
  killed = tmp_path / "killed"
  copy(multi, killed, ["backbone", "exit_heads", "accuracy.json", "accuracy.json.sha256"])
  procs = pipeline(killed, 2, 2)
  assert kill_when(procs[1], killed / "tables" / "fit" / "meta.json", poll=0.001), "no fit table"
  t0 = time.time()
  [(code, _, err), _] = finish(procs, timeout=120)
  stopped = time.time() - t0
  print(f"the other process stopped {stopped:.1f} s after the kill (heartbeat timeout 10 s)")
  assert code != 0 and stopped < 60, (code, stopped)
  assert "the JAX distributed service detected fatal errors" in err, err[-3000:]
  done = [s for s in ("fit", "cal", "test") if (killed / "tables" / s / "meta.json").exists()]
  assert done == ["fit"], f"killed after collecting {done}: not mid-collection"
  outs = finish(pipeline(killed, 2, 2), timeout=900)
  assert all(code == 0 for code, _, _ in outs), outs[0][2][-3000:]
  out = outs[0][1]
  assert "tables: fit collected" not in out and "tables: cal collected" in out, out[-3000:]
  same_tables(multi, killed)
  assert results(killed) == results(multi)
  # The overhead bench runs on a finished work directory (its figures: docs/results/hosts.md).
  out = subprocess.run([sys.executable, "-m", "experiments.bench_hosts", "--workdir",
                        str(multi), "--samples=496", "--reps=1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  last = json.loads(out.stdout.strip().splitlines()[-1])
  assert last["processes"]["devices"] == 4 and last["one_process"]["devices"] == 2, last
  assert last["processes"]["batch_size"] == 2 * last["one_process"]["batch_size"] == 496


def test_a_process_block_past_the_data_reads_as_padding():
  """The last batch of a split may leave a process's block of rows empty; it reads zeros of
  the model's input shape (a resizing source gives no shape for no rows)."""
  from quee_jax import collect, data
  split = data.load_splits("fashion_mnist_embedded", {"test": 10}, image_size=32).test
  assert split.read(np.array([], int))[0].shape == (0, 32, 32, 1)
  whole = list(collect.padded_batches(split.images, split.labels, 8))
  blocks = list(collect.padded_batches(split.images, split.labels, 8, rows=slice(4, 8)))
  assert [b[2] for b in blocks] == [b[2] for b in whole] == [8, 2]
  np.testing.assert_array_equal(blocks[0][0], whole[0][0][4:8])
  assert blocks[1][0].shape == (4, 32, 32, 1) and not blocks[1][0].any()  # rows 12..15 of 10
  batches = list(split.batches(8, rows=slice(4, 8)))
  assert [b.mask.tolist() for b in batches] == [[True] * 4, [False] * 4]
  np.testing.assert_array_equal(batches[0].images, whole[0][0][4:8])
