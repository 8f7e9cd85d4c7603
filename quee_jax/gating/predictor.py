"""Error predictors: one small MLP per gate, one sigmoid output per candidate.

All gates share the padded candidate layout of `paths` (slot 0 EXIT, slot
1 + q * G + m "level q up to exit m"), so predicting for any set of states is
one `vmap` over states with each state's gate parameters gathered; the
family's candidate mask drops what a state cannot take. The MLP runs its
matmuls at a low precision level (`PredictorConfig.level`) and is counted at
that level: at low budgets its cost competes with a 2-bit block.

Trained with optax on binary cross-entropy to (soft) targets, with a held-out
part of the fit split for early stopping. Saved and restored with orbax.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from quee_jax.core import cost, precision
from quee_jax.core.paths import PathFamily

Params = dict[str, Any]
MLP_KEYS = ("mean", "std", "w1", "b1", "w2", "b2")  # the network; "shrink" may sit beside it


@dataclasses.dataclass(frozen=True)
class PredictorConfig:
  hidden: int = 16
  epochs: int = 40
  batch_size: int = 128  # samples per step (every state of each sample)
  learning_rate: float = 3e-3
  weight_decay: float = 1e-4
  val_fraction: float = 0.2
  patience: int = 6  # epochs without validation improvement before stopping
  level: precision.Level = precision.Level("w8a8")  # what it runs (and is counted) at; a name works
  seed: int = 0

  def __post_init__(self):
    for name in ("hidden", "epochs", "batch_size", "patience"):
      if getattr(self, name) < 1:
        raise ValueError(f"PredictorConfig.{name}: expected >= 1, got {getattr(self, name)}")
    if not 0 < self.val_fraction < 1:
      raise ValueError(f"PredictorConfig.val_fraction: expected in (0, 1), got {self.val_fraction}")
    try:
      object.__setattr__(self, "level", precision.parse_level(self.level))
    except ValueError as e:
      raise ValueError(f"PredictorConfig.{e}") from None


def init(key: jax.Array, num_gates: int, num_features: int, num_candidates: int,
         hidden: int) -> Params:
  k1, k2 = jax.random.split(key)
  lim1, lim2 = np.sqrt(6 / (num_features + hidden)), np.sqrt(6 / (hidden + num_candidates))
  return {
      "mean": jnp.zeros(num_features), "std": jnp.ones(num_features),
      "w1": jax.random.uniform(k1, (num_gates, num_features, hidden), minval=-lim1, maxval=lim1),
      "b1": jnp.zeros((num_gates, hidden)),
      "w2": jax.random.uniform(k2, (num_gates, hidden, num_candidates), minval=-lim2, maxval=lim2),
      "b2": jnp.zeros((num_gates, num_candidates)),
  }


def logits(params: Params, x: jax.Array, gate: int | jax.Array,
           level: precision.Level = precision.FLOAT) -> jax.Array:
  """Pre-sigmoid outputs [..., C] of gate `gate`'s MLP on features x [..., F]."""
  z = (x - params["mean"]) / params["std"]
  h = jax.nn.relu(precision.dense(z, params["w1"][gate], params["b1"][gate], level))
  return precision.dense(h, params["w2"][gate], params["b2"][gate], level)


def predict(params: Params, x: np.ndarray, gates: np.ndarray, level: str = "float",
            batch: int = 2048) -> np.ndarray:
  """Predicted error probabilities [S, N, C] for features x [S, N, F] of states at `gates` [S]."""
  lvl = precision.parse_level(level)
  mlp = {k: jnp.asarray(params[k]) for k in MLP_KEYS}  # restored params are numpy
  fn = jax.jit(jax.vmap(lambda p_x, g: jax.nn.sigmoid(logits(mlp, p_x, g, lvl))))
  out = [np.asarray(fn(jnp.asarray(x[:, i:i + batch]), jnp.asarray(gates)))
         for i in range(0, x.shape[1], batch)]
  return np.concatenate(out, axis=1)


def macs_per_gate(num_features: int, hidden: int, num_candidates: int) -> cost.MacCount:
  """MACs of one predictor call, read off its jaxpr."""
  params = init(jax.random.key(0), 1, num_features, num_candidates, hidden)
  x = jax.ShapeDtypeStruct((1, num_features), jnp.float32)
  return cost.count_macs(lambda x: logits(params, x, 0), x)


def gate_overhead(family: PathFamily, num_features: int, cfg: PredictorConfig) -> np.ndarray:
  """[G] normalized cost of the predictor at each gate (none at the last, which always exits)."""
  c = family.costs
  macs = macs_per_gate(num_features, cfg.hidden, len(family.candidates))
  raw = macs.total if c.unit == "macs" else cost.bops(macs, cfg.level, c.float_bits)
  out = np.full(family.num_gates, raw / c.full_model)
  out[-1] = 0.0
  return out


def _loss(params, x, targets, mask, gates):
  z = jax.vmap(lambda xs, g: logits(params, xs, g))(x, gates)  # [S, b, C]
  bce = optax.sigmoid_binary_cross_entropy(z, targets)
  m = jnp.broadcast_to(mask[:, None, :], bce.shape)
  return jnp.sum(bce * m) / jnp.maximum(m.sum(), 1)


def train(x: np.ndarray, targets: np.ndarray, family: PathFamily, cfg: PredictorConfig,
          blind: Sequence[int] = ()) -> tuple[Params, dict]:
  """Fits the per-gate MLPs to targets [S, N, C] from features x [S, N, F].

  blind: feature columns the predictor must not see: their std is infinite, so their
    standardized input is 0 whatever they hold, in training and wherever the parameters run
    (the runtime included), exactly even under quantization.
  Returns the parameters with the best held-out loss, and a history dict (its
  `val_samples` are the held-out fit samples, e.g. for `shrinkage`).
  """
  S, N, F = x.shape
  if targets.shape[:2] != (S, N) or targets.shape[2] != len(family.candidates):
    raise ValueError(f"targets: expected shape {(S, N, len(family.candidates))}, got {targets.shape}")
  if S != family.num_states:
    raise ValueError(f"x: {S} states, the family has {family.num_states}")
  rng = np.random.default_rng(cfg.seed)
  order = rng.permutation(N)
  n_val = max(1, int(round(cfg.val_fraction * N)))
  val, tr = order[:n_val], order[n_val:]
  if len(tr) < cfg.batch_size:
    raise ValueError(f"batch_size: {cfg.batch_size} exceeds the {len(tr)} training samples")
  params = init(jax.random.key(cfg.seed), family.num_gates, F, len(family.candidates), cfg.hidden)
  flat = x[:, tr].reshape(-1, F)
  params["mean"] = jnp.asarray(flat.mean(0))
  std = np.where(flat.std(0) > 1e-6, flat.std(0), 1.0)
  std[list(blind)] = np.inf
  params["std"] = jnp.asarray(std)
  mask, gates = jnp.asarray(family.cand_mask, jnp.float32), jnp.asarray(family.gate)
  steps_per_epoch = len(tr) // cfg.batch_size
  opt = optax.adamw(optax.cosine_decay_schedule(cfg.learning_rate, cfg.epochs * steps_per_epoch),
                    weight_decay=cfg.weight_decay)
  frozen = {"mean": params["mean"], "std": params["std"]}
  trainable = {k: v for k, v in params.items() if k not in frozen}
  opt_state = opt.init(trainable)

  @jax.jit
  def step(trainable, opt_state, xb, tb):
    loss, grads = jax.value_and_grad(lambda p: _loss({**frozen, **p}, xb, tb, mask, gates))(trainable)
    updates, opt_state = opt.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  val_loss_fn = jax.jit(lambda p, xb, tb: _loss({**frozen, **p}, xb, tb, mask, gates))
  x_val, t_val = jnp.asarray(x[:, val]), jnp.asarray(targets[:, val])
  best, best_params, history, since = np.inf, trainable, {"train": [], "val": []}, 0
  for epoch in range(cfg.epochs):
    perm = rng.permutation(tr)
    losses = []
    for i in range(steps_per_epoch):
      idx = np.sort(perm[i * cfg.batch_size:(i + 1) * cfg.batch_size])
      trainable, opt_state, loss = step(trainable, opt_state, jnp.asarray(x[:, idx]),
                                        jnp.asarray(targets[:, idx]))
      losses.append(float(loss))
    v = float(val_loss_fn(trainable, x_val, t_val))
    history["train"].append(float(np.mean(losses)))
    history["val"].append(v)
    if v < best - 1e-6:
      best, best_params, since = v, trainable, 0
    else:
      since += 1
      if since >= cfg.patience:
        break
  history["best_val"] = best
  history["epochs"] = len(history["val"])
  history["val_samples"] = np.sort(val)
  return {**frozen, **best_params}, history


def _checkpointer() -> ocp.StandardCheckpointer:
  # Host arrays of this process alone: under several processes one of them evaluates,
  # and orbax must not wait for the others to save too.
  me = jax.process_index()
  return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}))


def save(params: Params, path: str) -> None:
  """Writes predictor parameters with orbax (a directory)."""
  ckpt = _checkpointer()
  ckpt.save(path, jax.tree.map(np.asarray, params), force=True)
  ckpt.wait_until_finished()


def load(path: str) -> Params:
  return _checkpointer().restore(path)


def shrinkage(predicted: np.ndarray, errors: np.ndarray, family: PathFamily,
              all_errors: np.ndarray | None = None) -> dict:
  """Calibrates the per-sample differences between candidates on held-out fit samples.

  Choosing the argmin of noisy predictions favours whichever candidate happens
  to be under-predicted (the winner's curse): where the per-sample difference
  between two paths carries no signal, the policy still jumps between levels.
  So each candidate's predicted error is written as the reference candidate's
  (the most expensive one) plus a difference d_c, and d_c is replaced by
  mean_true_diff_c + beta_c * (d_c - mean(d_c)), with beta_c in [0, 1] the
  least-squares slope of the true difference on the predicted one, per state
  and candidate. beta near 0 means the per-sample difference is noise: the
  population difference is used instead; near 1, the prediction stands.

  Args:
    predicted: [S, N, C] predictions on held-out fit samples.
    errors: [S, N, C] their true candidate errors.
    all_errors: [S, N', C] true errors of every fit sample, for the population
      differences (they involve no prediction, so need no held-out data).

  Returns:
    {"beta", "pred_mean", "true_mean"}: [S, C] arrays for `apply_shrinkage`.
  """
  ref = family.reference
  take = lambda a: np.take_along_axis(a, ref[:, None, None], axis=2)
  d = predicted - take(predicted)
  t = errors - take(errors)
  d_mean, t_mean = d.mean(1), t.mean(1)
  dc, tc = d - d_mean[:, None], t - t_mean[:, None]
  if all_errors is not None:
    t_mean = (all_errors - take(all_errors)).mean(1)
  var = (dc * dc).mean(1)
  beta = np.where(var > 1e-12, (dc * tc).mean(1) / np.maximum(var, 1e-12), 0.0)
  beta = np.clip(beta, 0.0, 1.0) * family.cand_mask
  return {"beta": beta.astype(np.float32), "pred_mean": d_mean.astype(np.float32),
          "true_mean": (t_mean * family.cand_mask).astype(np.float32)}


def apply_shrinkage(predicted, shrink: dict, family, states=None, xp=np):
  """Predicted errors with the calibrated differences of `shrinkage`.

  predicted: [S, N, C] for every state of `family`, or [n, C] for n samples
    in `states` [n] (the runtime's samples at a gate); the same arithmetic.
  family: anything with the family's `reference` [S] (a `PathFamily`, a `policy.Decision`).
  xp: numpy, or jax.numpy inside the runtime's program (shrink's arrays then jax arrays).
  """
  ref = xp.asarray(family.reference)
  if states is None:
    rows, ref = (lambda a: a[:, None]), ref[:, None, None]
  else:
    rows, ref = (lambda a: xp.asarray(a)[states]), ref[states][:, None]
  base = xp.take_along_axis(predicted, ref, axis=-1)
  d = predicted - base
  d = rows(shrink["true_mean"]) + rows(shrink["beta"]) * (d - rows(shrink["pred_mean"]))
  return xp.clip(base + d, 0.0, 1.0).astype(xp.float32)
