"""When can QuEE win? Measured conditions on a state table and a predictor.

  exit_auroc       per gate, how well the learned exit-error prediction ranks the
                   samples the exit gets wrong, against 1 - max prob (the signal
                   confidence early exit already has);
  switch_signal    per switch (gate, from level, to level), how many samples the
                   lower level hurts (right at full depth before, wrong after) and
                   helps, and the AUROC with which the predictor separates them:
                   0.5 means per-sample precision has no learnable signal there.
                   Hurt vs helped mixes in difficulty (helped samples were wrong
                   before), so also: among the samples right before, the AUROC
                   of telling those the switch breaks from those it keeps right;
  flips            at full depth, how many samples each pair of levels flips.
"""

from __future__ import annotations

import numpy as np

from quee_jax.core.paths import EXIT
from quee_jax.core.table import StateTable
from quee_jax.protocol import metrics


def exit_auroc(table: StateTable, predicted: np.ndarray) -> list[dict]:
  fam = table.family
  out = []
  for g, s in enumerate(fam.chain(fam.top)):
    if not fam.cand_mask[s, EXIT]:
      continue
    wrong = ~table.correct[s]
    out.append({"gate": g, "exit_after_block": fam.exits[g], "level": fam.ladder[fam.level[s]],
                "errors": int(wrong.sum()),
                "auroc_predictor": metrics.auroc(predicted[s, :, EXIT], wrong),
                "auroc_max_prob": metrics.auroc(-table.features["max_prob"][s], wrong)})
  return out


def switch_signal(table: StateTable, predicted: np.ndarray) -> list[dict]:
  fam = table.family
  G = fam.num_gates
  out = []
  for g in range(G - 1):
    for a in range(len(fam.ladder)):
      try:
        sigma = fam.find([fam.ladder[a]] * fam.exits[g])
        stay = fam.find([fam.ladder[a]] * fam.num_blocks)
      except ValueError:
        continue
      for b in range(len(fam.ladder)):
        slot_b, slot_a = 1 + b * G + (G - 1), 1 + a * G + (G - 1)
        if b == a or not fam.cand_mask[sigma, slot_b] or not fam.cand_mask[sigma, slot_a]:
          continue
        switch = fam.cand_state[sigma, slot_b]
        hurt = table.correct[stay] & ~table.correct[switch]
        helped = ~table.correct[stay] & table.correct[switch]
        flipped = hurt | helped
        score = predicted[sigma, :, slot_b] - predicted[sigma, :, slot_a]
        right = table.correct[stay]
        out.append({"gate": g, "after_block": fam.exits[g], "from": fam.ladder[a],
                    "to": fam.ladder[b], "hurt": int(hurt.sum()), "helped": int(helped.sum()),
                    "auroc_hurt_vs_helped": metrics.auroc(score[flipped], hurt[flipped]),
                    "auroc_hurt_among_right": metrics.auroc(score[right], hurt[right])})
  return out


def flips(table: StateTable) -> list[dict]:
  fam = table.family
  finals = {q: fam.chain(i)[-1] for i, q in enumerate(fam.ladder)}
  out = []
  for i, a in enumerate(fam.ladder):
    for b in fam.ladder[i + 1:]:
      ca, cb = table.correct[finals[a]], table.correct[finals[b]]
      out.append({"levels": [a, b], f"right_at_{a}_only": int((ca & ~cb).sum()),
                  f"right_at_{b}_only": int((cb & ~ca).sum())})
  return out


def summary(table: StateTable, predicted: np.ndarray) -> dict:
  return {"exit_auroc": exit_auroc(table, predicted),
          "switch_signal": switch_signal(table, predicted), "flips": flips(table)}
