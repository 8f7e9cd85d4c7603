"""Markdown tables of a results dict (results.json)."""

from __future__ import annotations

import numpy as np

from quee_jax.protocol import metrics

ORDER = ("quee", "quee_raw_targets", "quee_exit_only", "quee_quant_only", "ee_confidence",
         "static", "oracle_consistency", "oracle_path")


def _pct(x: float | None) -> str:
  return "—" if x is None else f"{100 * x:.2f}"


def _budget_cell(m: dict, budget: str) -> tuple[str, str]:
  """(cell, its footnote mark: "—", "†" or "") of a method's accuracy at a budget.

  A budget below every point a method has (on cal, where it chooses there; on test for the
  oracles) scores 1/num_classes, which the auc needs but a table would pass off as a measured
  accuracy: "—" where no seed reaches the budget, a † where only some do (their mean counts
  the others as 1/num_classes).
  """
  seeds = m.get("seeds") or [m]
  if "cost_at_budget" in m:
    reached = [s["cost_at_budget"][budget] is not None for s in seeds]
  else:  # as metrics.accuracy_at compares
    reached = [s["min_cost"] <= float(budget) + 1e-12 for s in seeds]
  if not any(reached):
    return "—", "—"
  cell = _pct(m["acc_at_budget"][budget])
  return (cell + " †", "†") if not all(reached) else (cell, "")


def methods_table(results: dict) -> str:
  """One row per method: auc, auc_16, min cost, accuracy at each budget (test, %, each point
  chosen on cal), the seed spread, and the auc of the test envelope (chosen on test: how much
  choosing on test would flatter the method); a footnote where a method has no point at or
  below a budget."""
  methods = results["methods"]
  names = [m for m in ORDER if m in methods] + sorted(m for m in methods if m not in ORDER)
  budgets = list(next(iter(methods.values()))["acc_at_budget"])
  head = ("| method | auc | auc_16 | min cost | " + " | ".join(f"acc@{b}" for b in budgets)
          + " | seed spread (auc / auc_16) | test envelope (auc / auc_16) |")
  lines, marks = [head, "|" + "---|" * (len(budgets) + 6)], set()
  for name in names:
    m = methods[name]
    spread = (f"{100 * m['auc_spread']:.2f} / {100 * m['auc_16_spread']:.2f}"
              if "auc_spread" in m else "")
    env = (f"{_pct(m['auc_test_envelope'])} / {_pct(m['auc_16_test_envelope'])}"
           if "auc_test_envelope" in m else "(oracle: chosen on test)")
    cells = [_budget_cell(m, b) for b in budgets]
    marks |= {mark for _, mark in cells}
    lines.append(f"| {name} | {_pct(m['auc'])} | {_pct(m['auc_16'])} | {m['min_cost']:.4f} | "
                 + " | ".join(c for c, _ in cells) + f" | {spread} | {env} |")
  notes = {"—": "— : the method has no operating point at or below this budget (its cheapest"
                " is above it on cal).",
           "†": "† : only some seeds have a point at or below this budget on cal; the mean"
                " counts the others at chance (1/num_classes), as the auc does."}
  if marks - {""}:
    lines.append("\n" + " ".join(notes[k] for k in ("—", "†") if k in marks))
  return "\n".join(lines)


def budget_table(results: dict) -> str:
  """QuEE's cal-chosen operating points beside the naive combination's, per budget: the point
  budget mode runs (QuEE's own where the paired test on cal certifies it better, else the
  naive one), QuEE's own, and what the z-rule of earlier versions ran."""
  q = results["methods"].get("quee")
  if not q:
    return ""
  lines = ["| budget | cal cost | test cost | test acc (seed spread) | fallbacks to naive |"
           " QuEE's own: test cost | test acc | cal gain over naive / SE / p-value (per seed) |"
           " naive test cost | naive test acc | z-rule: fallbacks | z-rule: test acc |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for b, e in q["budget_mode"].items():
    n, own, z = e["naive"], e["policy"], e["z_rule"]
    naive_cost = "—" if n is None else f"{n['test_cost']:.4f}"
    naive_acc = "—" if n is None else _pct(n["test_accuracy"])
    gains = ", ".join("—" if g is None else f"{_pct(g)} / {_pct(se)} / {p:.2g}"
                      for g, se, p in zip(e["cal_gain"], e["cal_gain_se"], e["p_value"]))
    lines.append(f"| {b} | {e['cal_cost']:.4f} | {e['test_cost']:.4f} | {_pct(e['test_accuracy'])}"
                 f" ({_pct(e['test_accuracy_spread'])}) | {e['fallbacks']} |"
                 f" {own['test_cost']:.4f} | {_pct(own['test_accuracy'])} | {gains} |"
                 f" {naive_cost} | {naive_acc} | {z['fallbacks']} | {_pct(z['test_accuracy'])} |")
  return "\n".join(lines)


def selection_table(results: dict) -> str:
  """How much choosing on test flatters each method: auc / auc_16 of its curve chosen on cal
  (with mixes: the headline), of the same with single points only, and of the test envelope
  (single points chosen on test, the headline until results version 5). Single points on cal
  against single points on test isolates the choice; mixes add what a per-sample coin buys."""
  methods, num_classes = results["methods"], results.get("num_classes")
  if num_classes is None:
    return ""
  lines = ["| method | chosen on cal (auc / auc_16) | on cal, single points | test envelope"
           " (chosen on test) |", "|---|---|---|---|"]
  for name in [m for m in ORDER if m in methods] + sorted(m for m in methods if m not in ORDER):
    m = methods[name]
    if "auc_test_envelope" not in m:
      continue
    runs = [s["points"] for s in m["seeds"]] if "seeds" in m else [m["points"]]
    single = [metrics.summarize(pts, num_classes, mix=False) for pts in runs]
    mean = lambda k: float(np.mean([s[k] for s in single]))
    lines.append(f"| {name} | {_pct(m['auc'])} / {_pct(m['auc_16'])} |"
                 f" {_pct(mean('auc'))} / {_pct(mean('auc_16'))} |"
                 f" {_pct(m['auc_test_envelope'])} / {_pct(m['auc_16_test_envelope'])} |")
  return "\n".join(lines)


RULE_NAMES = {"certified": "certified (risk control)", "z_rule": "z-rule (z = 1.645)",
              "mean_only": "cal mean alone"}


def risk_table(results: dict) -> str:
  """Per δ and rule, the test cost and test drop of the point each method's rule picks on cal,
  QuEE (mean over seeds, worst seed's drop) beside the naive combination."""
  risk = results.get("risk")
  if not risk or not risk["methods"]:
    return ""
  names = [n for n in ("quee", "ee_confidence") if n in risk["methods"]]
  lines = ["| δ (points) | rule | " + " | ".join(
               f"{n}: test cost | {n}: test drop" for n in names) + " |",
           "|---|---|" + "---|---|" * len(names)]

  def cells(entry) -> str:
    if entry is None:
      return "none passes | —"
    worst = (f" (worst seed {_pct(entry['test_drop_max'])})"
             if "test_drop_max" in entry and entry.get("seeds", 1) > 1 else "")
    return f"{entry['test_cost']:.4f} | {_pct(entry['test_drop'])}{worst}"

  first = risk["methods"][names[0]]
  for delta in first:
    for rule in first[delta]:
      lines.append(f"| {delta} | {RULE_NAMES.get(rule, rule)} | "
                   + " | ".join(cells(risk["methods"][n][delta][rule]) for n in names) + " |")
  return "\n".join(lines)


def diagnostics_tables(results: dict, split: str = "test") -> str:
  d = results.get("diagnostics", {}).get(split)
  if not d:
    return ""
  lines = ["| gate (after block) | errors | AUROC predictor | AUROC 1 - max prob |", "|---|---|---|---|"]
  for e in d["exit_auroc"]:
    lines.append(f"| {e['gate']} ({e['exit_after_block']}) | {e['errors']} | "
                 f"{e['auroc_predictor']:.3f} | {e['auroc_max_prob']:.3f} |")
  lines += ["", "| switch after block | from → to | hurt | helped | AUROC hurt vs helped |"
            " AUROC hurt among right |", "|---|---|---|---|---|---|"]
  for e in d["switch_signal"]:
    lines.append(f"| {e['after_block']} | {e['from']} → {e['to']} | {e['hurt']} | {e['helped']} | "
                 f"{e['auroc_hurt_vs_helped']:.3f} | {e['auroc_hurt_among_right']:.3f} |")
  return "\n".join(lines)


def markdown(results: dict) -> str:
  """report.md: the setting, the methods table, budget mode, risk control and diagnostics."""
  return (f"# {results.get('dataset', '')}: QuEE results\n\nladder {', '.join(results['ladder'])};"
          f" family {results['family']}; cost in {results['cost_unit']} (full model = 1); seeds"
          f" {results['seeds']}; full model test accuracy"
          f" {100 * results['full_model']['accuracy']:.2f}%.\n\n"
          + "Every accuracy is on test, at the operating point chosen on cal for its budget (the"
          " most accurate there within it, or a mix of two); the last column is the test"
          " envelope, the test split's own choice, shown once beside it.\n\n"
          + methods_table(results) + "\n\n## Choosing on cal or on test\n\n"
          + selection_table(results) + "\n\n## Budget mode (λ chosen on cal)\n\n"
          + budget_table(results)
          + f"\n\n## Risk control: at most δ below the full model (ε = {_eps(results)})\n\n"
          + risk_table(results) + "\n\n## Diagnostics (test)\n\n"
          + diagnostics_tables(results))


def _eps(results: dict) -> str:
  return f"{results['risk']['eps']:g}" if results.get("risk") else "—"
