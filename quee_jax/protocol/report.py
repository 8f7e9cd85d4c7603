"""Markdown tables of a results dict (results.json)."""

from __future__ import annotations

ORDER = ("quee", "quee_raw_targets", "quee_exit_only", "quee_quant_only", "ee_confidence",
         "static", "oracle_consistency", "oracle_path")


def _pct(x: float | None) -> str:
  return "—" if x is None else f"{100 * x:.2f}"


def _budget_cell(m: dict, budget: str) -> tuple[str, str]:
  """(cell, its footnote mark: "—", "†" or "") of a method's accuracy at a budget.

  `metrics.accuracy_at` scores a budget below a method's cheapest point as 1/num_classes,
  which the auc needs but a table would pass off as a measured accuracy: "—" where no seed
  reaches the budget, a † where only some do (their mean counts the others as 1/num_classes).
  """
  costs = [s["min_cost"] for s in m.get("seeds") or [m]]
  reached = [c <= float(budget) + 1e-12 for c in costs]  # as metrics.accuracy_at compares
  if not any(reached):
    return "—", "—"
  cell = _pct(m["acc_at_budget"][budget])
  return (cell + " †", "†") if not all(reached) else (cell, "")


def methods_table(results: dict) -> str:
  """One row per method: auc, auc_16, min cost, accuracy at each budget (test, %); a footnote
  where a method has no point at or below a budget."""
  methods = results["methods"]
  names = [m for m in ORDER if m in methods] + sorted(m for m in methods if m not in ORDER)
  budgets = list(next(iter(methods.values()))["acc_at_budget"])
  head = ("| method | auc | auc_16 | min cost | " + " | ".join(f"acc@{b}" for b in budgets)
          + " | seed spread (auc / auc_16) |")
  lines, marks = [head, "|" + "---|" * (len(budgets) + 5)], set()
  for name in names:
    m = methods[name]
    spread = (f"{100 * m['auc_spread']:.2f} / {100 * m['auc_16_spread']:.2f}"
              if "auc_spread" in m else "")
    cells = [_budget_cell(m, b) for b in budgets]
    marks |= {mark for _, mark in cells}
    lines.append(f"| {name} | {_pct(m['auc'])} | {_pct(m['auc_16'])} | {m['min_cost']:.4f} | "
                 + " | ".join(c for c, _ in cells) + f" | {spread} |")
  notes = {"—": "— : the method has no operating point at or below this budget (its min cost is"
                " above it).",
           "†": "† : only some seeds have a point at or below this budget; the mean counts the"
                " others at chance (1/num_classes), as the auc does."}
  if marks - {""}:
    lines.append("\n" + " ".join(notes[k] for k in ("—", "†") if k in marks))
  return "\n".join(lines)


def budget_table(results: dict) -> str:
  """QuEE's cal-chosen operating points beside the naive combination's, per budget: the point
  budget mode runs (QuEE's own or, where it fell back, the naive one) and QuEE's own."""
  q = results["methods"].get("quee")
  if not q:
    return ""
  lines = ["| budget | cal cost | test cost | test acc (seed spread) | fallbacks to naive |"
           " QuEE's own: test cost | test acc | cal gain over naive / its SE (per seed) |"
           " naive test cost | naive test acc |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for b, e in q["budget_mode"].items():
    n, own = e["naive"], e["policy"]
    naive_cost = "—" if n is None else f"{n['test_cost']:.4f}"
    naive_acc = "—" if n is None else _pct(n["test_accuracy"])
    gains = ", ".join("—" if g is None else f"{_pct(g)} / {_pct(se)}"
                      for g, se in zip(e["cal_gain"], e["cal_gain_se"]))
    lines.append(f"| {b} | {e['cal_cost']:.4f} | {e['test_cost']:.4f} | {_pct(e['test_accuracy'])}"
                 f" ({_pct(e['test_accuracy_spread'])}) | {e['fallbacks']} |"
                 f" {own['test_cost']:.4f} | {_pct(own['test_accuracy'])} | {gains} |"
                 f" {naive_cost} | {naive_acc} |")
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
  """report.md: the setting, the methods table, budget mode and diagnostics."""
  return (f"# {results.get('dataset', '')}: QuEE results\n\nladder {', '.join(results['ladder'])};"
          f" family {results['family']}; cost in {results['cost_unit']} (full model = 1); seeds"
          f" {results['seeds']}; full model test accuracy"
          f" {100 * results['full_model']['accuracy']:.2f}%.\n\n"
          + methods_table(results) + "\n\n## Budget mode (λ chosen on cal)\n\n"
          + budget_table(results) + "\n\n## Diagnostics (test)\n\n"
          + diagnostics_tables(results))
