r"""Collection throughput vs a plain float multi-exit forward, side by side.

Times, on the same device and the same batch, (a) the jit-compiled collection
step that evaluates every state of a path family and (b) a float forward with
every exit head, after warm-up, as the median of several repetitions. The
weights are random: throughput does not depend on them.

  python -m experiments.bench_collect                     # ViT dim 96, depth 6, patch 7
  python -m experiments.bench_collect --ladder=float,w8a8,w4a4 --family=constant

The last line is a JSON object with `states_per_s` (state x sample
evaluations per second during collection) and `ratio_vs_forward` (collection
time / forward time on the batch); `block_ratio` is the ratio a perfect
implementation would reach (block evaluations of the family / of a forward).
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import quee_jax as q
from quee_jax.core import precision

FLAGS = flags.FLAGS
flags.DEFINE_string("ladder", "float,w4a4,w2a4,w2a2", "Precision ladder.")
flags.DEFINE_enum("family", "switch_once", list(q.FAMILIES), "Path family.")
flags.DEFINE_integer("batch_size", 128, "Samples per batch.")
flags.DEFINE_integer("reps", 7, "Timed repetitions of each (median reported).")
flags.DEFINE_integer("rows_per_call", None, "Samples x states per block call (default: auto).")
flags.DEFINE_integer("image_size", 28, "Image side.")
flags.DEFINE_integer("channels", 1, "Image channels.")
flags.DEFINE_integer("patch", 7, "Patch side.")
flags.DEFINE_integer("dim", 96, "Model width.")
flags.DEFINE_integer("depth", 6, "Blocks.")
flags.DEFINE_integer("heads", 4, "Attention heads.")


def _median_times(fns, reps, min_s=0.5):
  """Median seconds per call of each fn.

  Each repetition times enough back-to-back calls to last about `min_s`
  (a forward of a small ViT takes milliseconds), and repetitions of the fns
  are interleaved so that drift on a shared machine hits all of them alike.
  """
  calls = []
  for fn in fns:
    jax.block_until_ready(fn())  # compile and warm up
    start = time.perf_counter()
    jax.block_until_ready(fn())
    calls.append(max(1, round(min_s / (time.perf_counter() - start))))
  times = [[] for _ in fns]
  for _ in range(reps):
    for fn, n, ts in zip(fns, calls, times):
      start = time.perf_counter()
      for _ in range(n):
        out = fn()
      jax.block_until_ready(out)
      ts.append((time.perf_counter() - start) / n)
  return [float(np.median(ts)) for ts in times]


def main(argv):
  del argv
  precision.avoid_triton_gemm()  # before jax starts: exact int8 dots on NVIDIA GPUs
  cfg = q.vit.ViTConfig(image_size=FLAGS.image_size, channels=FLAGS.channels, patch=FLAGS.patch,
                        dim=FLAGS.dim, depth=FLAGS.depth, heads=FLAGS.heads,
                        mlp_dim=4 * FLAGS.dim, num_classes=10)
  params = q.vit.init(jax.random.key(0), cfg)
  bb = q.vit.backbone(cfg)
  ladder = q.parse_ladder(FLAGS.ladder)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(FLAGS.batch_size, cfg.image_size, cfg.image_size,
                                   cfg.channels)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, 10, FLAGS.batch_size).astype(np.int32))
  costs = q.backbone_costs(bb, params, x, ladder)
  fam = q.build_family(FLAGS.family, ladder, bb.exits, costs)

  collect = jax.jit(q.make_collect_fn(bb, fam, rows_per_call=FLAGS.rows_per_call))
  forward = jax.jit(lambda p, x: q.vit.forward(p, x, cfg, q.FLOAT)[0])
  t_collect, t_forward = _median_times(
      [lambda: collect(params, x, y), lambda: forward(params, x)], FLAGS.reps)

  bounds = np.diff((0,) + fam.exits)
  block_evals = int(bounds[fam.gate].sum())
  result = {
      "device": jax.devices()[0].device_kind, "num_devices": 1,
      "ladder": ladder, "family": fam.name,
      "num_states": fam.num_states, "batch_size": FLAGS.batch_size,
      "collect_s_per_batch": round(t_collect, 4), "forward_s_per_batch": round(t_forward, 4),
      "states_per_s": round(fam.num_states * FLAGS.batch_size / t_collect, 1),
      "forward_img_per_s": round(FLAGS.batch_size / t_forward, 1),
      "ratio_vs_forward": round(t_collect / t_forward, 2),
      "block_ratio": round(block_evals / cfg.depth, 2),
  }
  print(f"model: ViT dim {cfg.dim}, depth {cfg.depth}, patch {cfg.patch}, "
        f"{cfg.num_tokens} tokens; family {fam.name} over {result['ladder']}: "
        f"{fam.num_states} states")
  print(f"forward (float, all exits): {t_forward * 1e3:.1f} ms/batch, "
        f"{result['forward_img_per_s']:.0f} img/s")
  print(f"collection (all states):    {t_collect * 1e3:.1f} ms/batch, "
        f"{result['states_per_s']:.0f} states x samples/s")
  print(f"collection / forward time: {result['ratio_vs_forward']:.2f}x "
        f"(block evaluations: {result['block_ratio']:.2f}x)")
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
