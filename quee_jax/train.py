"""Training: a backbone from scratch, and exit heads on a frozen backbone.

QuEE is post-training: users bring a trained backbone, attach exit heads and
never retrain the backbone. `train_backbone` gives them a backbone when they
have none (final head only); `train_exit_heads` trains every exit head at once
on frozen features, optionally computed at a quantization level.

Both resume: an orbax `CheckpointManager` saves {params, opt_state} every
`checkpoint_every` steps, and the data order and augmentation of step k depend
only on (seed, k), so a killed run restarted from its latest checkpoint ends
with the parameters an uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from quee_jax import models
from quee_jax.core import checkpoints, hosts, precision
from quee_jax.core.backbone import Backbone, ByIdentity, exit_logits, exit_states
from quee_jax.core.precision import FLOAT, Level
from quee_jax.core.progress import Progress
from quee_jax.data import Split
from quee_jax.models import vit

Params = Any
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation settings (AdamW, linear warmup + cosine decay, label smoothing)."""

  epochs: float = 10
  batch_size: int = 128
  learning_rate: float = 1e-3
  warmup_epochs: float = 1.0
  weight_decay: float = 0.05
  label_smoothing: float = 0.1
  grad_clip: float = 1.0
  augment: bool = True  # only where the dataset defines an augmentation
  drop_path: float = 0.0  # stochastic depth of the last block (linear from 0 over depth)
  mixup: float = 0.0  # Beta(mixup, mixup) image/label mixing of batch pairs (0: off)
  seed: int = 0
  checkpoint_every: int = 200  # steps

  def __post_init__(self):
    positive = ("epochs", "batch_size", "learning_rate", "checkpoint_every")
    for name in positive:
      if getattr(self, name) <= 0:
        raise ValueError(f"TrainConfig.{name}: expected > 0, got {getattr(self, name)}")
    for name in ("warmup_epochs", "weight_decay", "grad_clip"):
      if getattr(self, name) < 0:
        raise ValueError(f"TrainConfig.{name}: expected >= 0, got {getattr(self, name)}")
    if not 0 <= self.label_smoothing < 1:
      raise ValueError(f"TrainConfig.label_smoothing: expected in [0, 1), got {self.label_smoothing}")
    if not 0 <= self.drop_path < 1:
      raise ValueError(f"TrainConfig.drop_path: expected in [0, 1), got {self.drop_path}")
    if self.mixup < 0:
      raise ValueError(f"TrainConfig.mixup: expected >= 0, got {self.mixup}")

  def steps(self, num_samples: int) -> int:
    return max(1, round(self.epochs * (num_samples // self.batch_size)))


def _optimizer(tc: TrainConfig, total_steps: int, steps_per_epoch: int) -> optax.GradientTransformation:
  warmup = min(round(tc.warmup_epochs * steps_per_epoch), total_steps - 1)
  schedule = optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, warmup, total_steps)
  # Decay matrices only: LayerNorm scales and biases keep their values.
  decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
  return optax.chain(optax.clip_by_global_norm(tc.grad_clip) if tc.grad_clip else optax.identity(),
                     optax.adamw(schedule, weight_decay=tc.weight_decay, mask=decay_mask))


def cross_entropy(logits: jax.Array, targets: jax.Array, smoothing: float = 0.0) -> jax.Array:
  """Softmax cross-entropy to probability targets (one-hot or mixed), label-smoothed."""
  return optax.softmax_cross_entropy(logits, optax.smooth_labels(targets, smoothing))


def mixup(key: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int,
          alpha: float) -> tuple[jax.Array, jax.Array]:
  """Mixes the batch with itself reversed, one Beta(alpha, alpha) weight per batch.

  Returns the mixed images and soft targets [batch, num_classes]. Augmentation
  of the loss rather than of the data: it suits clothes and digits as well,
  where crops and flips are off.
  """
  lam = jax.random.beta(key, alpha, alpha)
  onehot = jax.nn.one_hot(labels, num_classes)
  return lam * images + (1 - lam) * images[::-1], lam * onehot + (1 - lam) * onehot[::-1]


def fit(loss_fn: Callable[[Params, Params, jax.Array, jax.Array, jax.Array],
                          tuple[jax.Array, jax.Array]],
        trainable: Params, frozen: Params, split: Split, tc: TrainConfig, workdir: str, *,
        desc: str, evaluate: Callable[[Params], dict] | None = None,
        on_step: Callable[[int, dict], None] | None = None) -> Params:
  """Minimises `loss_fn(trainable, frozen, images, labels, key) -> (loss, accuracy)` over `split`.

  `accuracy` is a scalar or a dict of named scalars (e.g. one per exit); each is averaged
  over the epoch in the per-epoch log line and passed to `on_step` under its name.

  `key` is derived from (seed, step), like the batches, so resuming replays it.

  Resumes from the latest checkpoint in `workdir`; `evaluate(trainable)`
  runs at the end of every epoch and its dict is logged; `on_step(step, metrics)`
  is called after every step.
  """
  steps_per_epoch = len(split) // tc.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"batch_size: {tc.batch_size} exceeds the {len(split)} samples of {split.name}")
  total = tc.steps(len(split))
  opt = _optimizer(tc, total, steps_per_epoch)
  # Data-parallel over every device of every process (`hosts`): the state is whole on each
  # device, each batch split by rows, and XLA sums the gradients across devices.
  mesh = hosts.mesh()
  whole, by_sample = hosts.data_shardings(mesh)
  if tc.batch_size % mesh.size:
    raise ValueError(f"batch_size: must be a multiple of the {mesh.size} devices it is split"
                     f" over, got {tc.batch_size}")
  manager = checkpoints.manager(workdir, tc.checkpoint_every)
  state, start = checkpoints.restore(manager, jax.device_put(
      {"params": trainable, "opt_state": opt.init(trainable)}, whole), workdir)
  if start:
    log.info("%s: resuming at step %d of %d from %s", desc, start, total, workdir)
  frozen = jax.device_put(frozen, whole)  # an argument: a closed-over array is a constant

  base_key = jax.random.key(tc.seed)

  @functools.partial(jax.jit, out_shardings=whole)
  def train_step(state, frozen, images, labels, step):
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], frozen, images, labels, jax.random.fold_in(base_key, step))
    updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
    named = acc if isinstance(acc, dict) else {"accuracy": acc}
    return {"params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state}, {"loss": loss, **named}

  mine = hosts.local_rows(by_sample, tc.batch_size)  # this process reads its rows only
  batches = split.batches(tc.batch_size, shuffle=True, seed=tc.seed, start_step=start,
                          num_steps=total - start, augment=tc.augment, rows=mine)
  sums, count, t0 = {}, 0, time.time()
  # A bar on terminals; periodic lines in log files; and the per-epoch lines in both.
  with Progress(total, desc, logger=log, initial=start, enabled=hosts.is_writer()) as bar:
    for step, batch in enumerate(batches, start=start + 1):
      state, metrics = train_step(state, frozen,
                                  hosts.global_batch(batch.images, by_sample, tc.batch_size),
                                  hosts.global_batch(batch.labels, by_sample, tc.batch_size),
                                  step)
      manager.save(step, args=ocp.args.StandardSave(state), force=step == total)
      metrics = {k: float(v) for k, v in metrics.items()}
      for k in metrics:
        sums[k] = sums.get(k, 0.0) + metrics[k]
      count += 1
      bar.update(1, loss=f"{metrics['loss']:.3f}")
      if on_step is not None:
        on_step(step, metrics)
      if step % steps_per_epoch == 0 or step == total:
        summary = {k: v / count for k, v in sums.items()}
        if evaluate is not None:
          summary.update(evaluate(state["params"]))
        log.info("%s epoch %.1f (step %d/%d, %.0fs): %s", desc, step / steps_per_epoch,
                     step, total, time.time() - t0,
                     ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
        sums, count = {}, 0
  manager.wait_until_finished()
  manager.close()
  return state["params"]


def _merge_last_head(trainable: Params, frozen_heads: list) -> Params:
  out = {k: v for k, v in trainable.items() if k != "last_head"}
  return {**out, "heads": [*frozen_heads, trainable["last_head"]]}


def train_backbone(cfg: vit.ViTConfig, split: Split, tc: TrainConfig, workdir: str, *,
                   params: Params | None = None, eval_split: Split | None = None,
                   on_step: Callable[[int, dict], None] | None = None) -> Params:
  """Trains a ViT from scratch (or from `params`) with the loss on the final exit only.

  The intermediate exit heads are left as they are (they are neither trained
  nor decayed here); `train_exit_heads` trains them on the frozen result.
  """
  if params is None:
    params = vit.init(jax.random.key(tc.seed), cfg)
  trainable = {k: v for k, v in params.items() if k != "heads"}
  trainable["last_head"] = params["heads"][-1]
  frozen_heads = params["heads"][:-1]
  last = len(cfg.exits) - 1

  def loss_fn(p, frozen, images, labels, key):
    del frozen
    targets = jax.nn.one_hot(labels, cfg.num_classes)
    if tc.mixup > 0:
      images, targets = mixup(jax.random.fold_in(key, cfg.depth), images, labels,
                              cfg.num_classes, tc.mixup)
    h = vit.embed(p, images, cfg)
    for i in range(cfg.depth):
      rate = tc.drop_path * (i + 1) / cfg.depth
      drop = (jax.random.fold_in(key, i), rate) if rate > 0 else None
      h = vit.block(p, i, h, FLOAT, cfg, drop)
    logits = vit.exit_head({"heads": [None] * last + [p["last_head"]]}, last, h, cfg)
    # Accuracy against the dominant label of each (mixed) image.
    acc = (jnp.argmax(logits, -1) == jnp.argmax(targets, -1)).mean()
    return cross_entropy(logits, targets, tc.label_smoothing).mean(), acc

  evaluate = None
  if eval_split is not None:
    evaluate = lambda p: {f"{eval_split.name}_accuracy": float(
        evaluate_exits(models.backbone(cfg), _merge_last_head(p, frozen_heads),
                       eval_split)[-1])}
  trained = fit(loss_fn, trainable, None, split, tc, workdir, desc="backbone",
                evaluate=evaluate, on_step=on_step)
  return _merge_last_head(trained, frozen_heads)


def exit_features(bb: Backbone, params: Params, inputs: jax.Array,
                  level: Level = FLOAT) -> list[jax.Array]:
  """Hidden states at every exit, from one forward at `level`, without gradients."""
  return [jax.lax.stop_gradient(h)
          for h in exit_states(bb, params, inputs, (level,) * bb.num_blocks)]


def train_exit_heads(bb: Backbone, params: Params, split: Split, tc: TrainConfig,
                     workdir: str, *, level: Level | str = FLOAT,
                     eval_split: Split | None = None,
                     on_step: Callable[[int, dict], None] | None = None) -> Params:
  """Trains every exit head at once on the frozen backbone's features at `level`.

  Works for any backbone (`models.backbone(cfg)` for a ViT or BERT, a Flax model
  through `models.flax_adapter`) whose params keep the heads under 'heads'. Each head
  starts from its current value (the final head from the backbone's). The loss is the
  mean over exits; the backbone's parameters are not changed. The per-epoch log line
  gives every exit's train accuracy and, with `eval_split` (e.g. cal; optional), its
  accuracy there at `level`.
  """
  level = precision.parse_level(level)
  frozen = {k: v for k, v in params.items() if k != "heads"}

  def loss_fn(heads, backbone, inputs, labels, key):
    del key
    feats = exit_features(bb, backbone, inputs, level)
    logits = jnp.stack([bb.exit_head({"heads": heads}, e, h) for e, h in enumerate(feats)])
    targets = jax.nn.one_hot(labels, bb.num_classes)[None]  # the same for every exit
    loss = cross_entropy(logits, targets, tc.label_smoothing).mean()
    # Every exit's own train accuracy: the last exit's alone says little about the others.
    right = (jnp.argmax(logits, -1) == labels[None]).mean(axis=1)
    return loss, {f"train_exit{e + 1}": right[e] for e in range(len(feats))}

  evaluate = None
  if eval_split is not None:
    evaluate = lambda heads: {f"{eval_split.name}_exit{e + 1}": float(a) for e, a in enumerate(
        evaluate_exits(bb, {**frozen, "heads": heads}, eval_split, level))}
  heads = fit(loss_fn, params["heads"], frozen, split, tc, workdir,
              desc=f"exit heads ({level.name})", evaluate=evaluate, on_step=on_step)
  return {**frozen, "heads": heads}


@functools.partial(jax.jit, static_argnums=(2, 3))
def _exit_predictions(params: Params, inputs: jax.Array, bb: ByIdentity, levels) -> jax.Array:
  # Module-level and keyed on (backbone, levels): per-epoch evaluations compile once
  # (models.backbone and FlaxModel.backbone hand out one Backbone per config).
  return jnp.argmax(exit_logits(bb.value, params, inputs, levels), -1)


def evaluate_exits(bb: Backbone, params: Params, split: Split,
                   levels: Level | str | list = FLOAT, batch_size: int = 500) -> np.ndarray:
  """Accuracy of every exit on `split` with blocks at `levels` (one level or one per block)."""
  if isinstance(levels, str):  # one level (a Level is a str) for every block
    levels = [levels] * bb.num_blocks
  levels = tuple(precision.parse_level(q) for q in levels)
  correct, n = np.zeros(len(bb.exits)), 0
  for batch in split.batches(batch_size):
    pred = np.asarray(_exit_predictions(params, batch.images, ByIdentity(bb), levels))
    correct += ((pred == batch.labels) & batch.mask).sum(axis=1)
    n += batch.mask.sum()
  return correct / n


def accuracy_table(bb: Backbone, params: Params, split: Split,
                   ladder: precision.Ladder) -> dict[str, list[float]]:
  """{level name: accuracy of every exit} with all blocks at that level."""
  return {level.name: evaluate_exits(bb, params, split, level).tolist() for level in ladder}
