r"""AQT and qwix side by side on a finished work directory, and the Flax adapter against the
project's ViT.

  python -m experiments.analysis.backends --workdir /tmp/fm_demo --flax
  python -m experiments.analysis.backends --workdir /tmp/minilm --time_batch 64

For every level of the work directory's ladder (every block at that level), on its test
split: each backend's accuracy at every exit, how often the two backends predict the same
class (every exit pooled, and the last exit) and the largest |logit difference|. Then the
CPU time of one block per level under each backend, measured in one run, interleaved
(median of `--reps` jitted calls on `--time_batch` samples' hidden states).

With `--flax` (a ViT work directory): the trained ViT is written out under big_vision's names,
loaded into the big_vision-structured linen ViT of `quee_jax/examples/big_vision_vit.py`,
wrapped by the Flax adapter with the same exit heads, and compared with the project's ViT per
backend and level (largest |logit difference|, prediction agreement), the adapter's block time
beside the hand-written block's; at qwix levels also beside qwix's own Flax route
(`quantize_model` + `PtqProvider` on the linen block, the seam's calibration): its largest
difference from the adapter's block output and its block time. The last line printed is a JSON
object with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import traverse_util

from experiments import bench_runtime
from quee_jax.examples import big_vision_vit
from quee_jax import models
from quee_jax.core import precision
from quee_jax.core.backbone import Backbone, exit_logits
from quee_jax.models import vit, vit_import


def all_logits(bb: Backbone, params, inputs: np.ndarray, level: precision.Level,
               batch: int) -> np.ndarray:
  """[exits, N, classes] float32 logits with every block at `level`."""
  fn = jax.jit(lambda p, x: exit_logits(bb, p, x, (level,) * bb.num_blocks))
  return np.concatenate([np.asarray(fn(params, inputs[i:i + batch]))
                         for i in range(0, len(inputs), batch)], axis=1)


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
  """How alike two [exits, N, classes] logit arrays are."""
  same = a.argmax(-1) == b.argmax(-1)
  return {"agree": float(same.mean()), "agree_last_exit": float(same[-1].mean()),
          "max_abs_logit_diff": float(np.abs(a - b).max())}


def block_seconds(bb: Backbone, params, h: jax.Array, level: precision.Level, reps: int
                  ) -> float:
  """Median seconds of one jitted call of block 0 at `level` on the hidden states h."""
  fn = jax.jit(lambda p, h: bb.block(p, 0, h, level))
  return bench_runtime.median_seconds(lambda: jax.block_until_ready(fn(params, h)), reps)


def compare_backends(plan, params, inputs, labels, batch: int, time_batch: int, reps: int
                     ) -> dict:
  bbs = {b: models.backbone(plan.model, b) for b in precision.BACKENDS}
  h = jax.jit(bbs["aqt"].embed)(params, inputs[:time_batch])
  out = {}
  for level in plan.ladder:
    logits = {b: all_logits(bb, params, inputs, level, batch) for b, bb in bbs.items()}
    row = agreement(logits["aqt"], logits["qwix"])
    for b in bbs:
      row[f"{b}_accuracy"] = (logits[b].argmax(-1) == labels[None]).mean(axis=1).tolist()
    # Interleaved, so that a busy machine slows both backends alike.
    secs = {b: [] for b in bbs}
    for _ in range(2):
      for b, bb in bbs.items():
        secs[b].append(block_seconds(bb, params, h, level, reps))
    for b in bbs:
      row[f"{b}_block_ms"] = 1e3 * min(secs[b])
    out[level] = row
  return out


def qwix_ptq_block(module, block_params, h: jax.Array, level: precision.Level):
  """qwix's own PTQ of a linen block at `level` (the seam's calibration): (apply, its params)."""
  model = qwix.quantize_model(module, qwix.PtqProvider([precision.qwix_rule(level)]))
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), h))["params"]
  quantized = qwix.quantize_params(jax.tree.map(jnp.asarray, block_params), abstract)
  return jax.jit(lambda p, h: model.apply({"params": p}, h)[0]), quantized


def compare_flax(plan, params, inputs, batch: int, time_batch: int, reps: int) -> dict:
  cfg: vit.ViTConfig = plan.model
  checkpoint = big_vision_vit.export_big_vision(params, cfg)
  shape = big_vision_vit.ViTShape(
      patch=cfg.patch, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, mlp_dim=cfg.mlp_dim,
      num_classes=cfg.num_classes, image_size=cfg.image_size, channels=cfg.channels,
      pool=cfg.pool, posemb=cfg.posemb, exits=cfg.exits)
  model = big_vision_vit.flax_model(shape)
  loaded = traverse_util.unflatten_dict(checkpoint, sep="/")
  flax_params = {**model.init(jax.random.key(0), loaded), "heads": params["heads"]}
  # The round trip through the importer reads the same file the linen model loaded.
  reimported = {**vit_import.import_big_vision(checkpoint, cfg, jax.random.key(0),
                                               load_head=False), "heads": params["heads"]}
  out = {}
  for backend in precision.BACKENDS:
    pure_bb, flax_bb = models.backbone(cfg, backend), model.backbone(backend)
    h = jax.jit(pure_bb.embed)(reimported, inputs[:time_batch])
    for level in plan.ladder:
      row = agreement(all_logits(pure_bb, reimported, inputs, level, batch),
                      all_logits(flax_bb, flax_params, inputs, level, batch))
      row["pure_block_ms"] = 1e3 * block_seconds(pure_bb, reimported, h, level, reps)
      row["flax_block_ms"] = 1e3 * block_seconds(flax_bb, flax_params, h, level, reps)
      if backend == "qwix" and not level.is_float:
        block = big_vision_vit.Encoder1DBlock(cfg.mlp_dim, cfg.heads)
        ptq, ptq_params = qwix_ptq_block(block, loaded["Transformer"]["encoderblock_0"], h,
                                         level)
        adapter = jax.jit(lambda p, h: flax_bb.block(p, 0, h, level))(flax_params, h)
        row["ptq_max_abs_diff"] = float(jnp.abs(ptq(ptq_params, h) - adapter).max())
        row["ptq_block_ms"] = 1e3 * bench_runtime.median_seconds(
            lambda: jax.block_until_ready(ptq(ptq_params, h)), reps)
      out[f"{backend}/{level}"] = row
  return out


def main(argv: list[str]) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True, help="A work directory finished by experiments.run.")
  ap.add_argument("--flax", action="store_true", help="Also compare the Flax adapter (ViT only).")
  ap.add_argument("--batch", type=int, default=500, help="Inputs per forward pass.")
  ap.add_argument("--time_batch", type=int, default=256, help="Samples per timed block call.")
  ap.add_argument("--reps", type=int, default=5, help="Timed calls per measurement.")
  args = ap.parse_args(argv)
  for name in ("batch", "time_batch", "reps"):
    if getattr(args, name) < 1:
      sys.exit(f"--{name}: expected a positive int, got {getattr(args, name)}")
  try:
    _, plan, splits, params, _ = bench_runtime.load_workdir(args.workdir)
  except ValueError as e:
    sys.exit(str(e))
  if args.flax and not isinstance(plan.model, vit.ViTConfig):
    sys.exit("--flax: the example linen model is a ViT; this work directory holds a"
             f" {type(plan.model).__name__}")
  inputs, labels = splits.test.images[:], np.asarray(splits.test.labels)
  print(f"{args.workdir}: {len(labels)} test inputs, ladder {list(plan.ladder)};"
        f" {jax.devices()[0].device_kind}, jax {jax.__version__}")
  report = {"workdir": args.workdir, "backends": compare_backends(
      plan, params, inputs, labels, args.batch, args.time_batch, args.reps)}
  exits = plan.model.exits
  print("\n| level | exit | AQT acc | qwix acc |")
  print("|---|---|---|---|")
  for level, row in report["backends"].items():
    for e, (a, b) in enumerate(zip(row["aqt_accuracy"], row["qwix_accuracy"])):
      print(f"| {level} | {exits[e]} | {100 * a:.2f} | {100 * b:.2f} |")
  print("\n| level | same prediction (all exits / last) | max abs logit diff |"
        " block ms AQT | block ms qwix | qwix / AQT |")
  print("|---|---|---|---|---|---|")
  for level, r in report["backends"].items():
    print(f"| {level} | {100 * r['agree']:.2f}% / {100 * r['agree_last_exit']:.2f}% |"
          f" {r['max_abs_logit_diff']:.3g} | {r['aqt_block_ms']:.2f} | {r['qwix_block_ms']:.2f} |"
          f" {r['qwix_block_ms'] / r['aqt_block_ms']:.2f}x |")
  if args.flax:
    report["flax"] = compare_flax(plan, params, inputs, args.batch, args.time_batch, args.reps)
    print("\nFlax adapter (linen ViT, big_vision names) against the project's ViT:")
    print("| backend/level | same prediction (all exits) | max abs logit diff |"
          " block ms pure | block ms adapter |")
    print("|---|---|---|---|---|")
    for key, r in report["flax"].items():
      print(f"| {key} | {100 * r['agree']:.2f}% | {r['max_abs_logit_diff']:.3g} |"
            f" {r['pure_block_ms']:.2f} | {r['flax_block_ms']:.2f} |")
    print("\nqwix's own PTQ of the linen block (quantize_model + PtqProvider) against the"
          " adapter's qwix block:")
    print("| level | max abs diff of block outputs | block ms PTQ | block ms adapter |")
    print("|---|---|---|---|")
    for key, r in report["flax"].items():
      if "ptq_block_ms" in r:
        print(f"| {key} | {r['ptq_max_abs_diff']:.3g} | {r['ptq_block_ms']:.2f} |"
              f" {r['flax_block_ms']:.2f} |")
  print(json.dumps(report))


if __name__ == "__main__":
  main(sys.argv[1:])
