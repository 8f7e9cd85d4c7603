"""report.md: budgets a method cannot reach are shown as such, not as chance accuracy."""

from quee_jax.protocol import metrics, report


def _method(min_costs, acc):
  """A method chosen on cal whose seeds' cheapest cal points cost min_costs."""
  cost_at = lambda c: {b: (None if c > float(b) else c) for b in acc}
  seeds = [{"seed": i, "min_cost": c, "cost_at_budget": cost_at(c)}
           for i, c in enumerate(min_costs)]
  return {"auc": 0.8, "auc_16": 0.8, "min_cost": sum(min_costs) / len(min_costs),
          "auc_spread": 0.0, "auc_16_spread": 0.0, "acc_at_budget": acc, "seeds": seeds,
          "cost_at_budget": cost_at(min(min_costs)), "auc_test_envelope": 0.81,
          "auc_16_test_envelope": 0.82}


def test_unreachable_budgets_are_a_dash_with_a_footnote():
  results = {"methods": {
      "quee": _method([0.1], {"0.0625": 0.1, "0.5": 0.9}),  # 0.1 = 1/num_classes: no point
      "static": _method([0.05, 0.3], {"0.0625": 0.45, "0.5": 0.85}),  # one seed reaches 1/16
      "oracle_path": {"auc": 0.7, "auc_16": 0.7, "min_cost": 0.5,  # an oracle: test's min cost
                      "acc_at_budget": {"0.0625": 0.1, "0.5": 0.8}}}}
  table = report.methods_table(results)
  rows = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ")}
  assert "| 0.1000 | — | 90.00 |" in rows["quee"] and "10.00" not in rows["quee"]
  assert "| 45.00 † | 85.00 |" in rows["static"]
  assert "| — | 80.00 |" in rows["oracle_path"] and "chosen on test" in rows["oracle_path"]
  assert "| 81.00 / 82.00 |" in rows["quee"]  # the test envelope, labelled beside
  assert "— : the method has no operating point at or below this budget" in table
  assert "† : only some seeds" in table


def test_reachable_budgets_have_no_footnote():
  results = {"methods": {"quee": _method([0.01], {"0.0625": 0.7, "0.5": 0.9})}}
  table = report.methods_table(results)
  assert "| 70.00 | 90.00 |" in table and "—" not in table and "†" not in table


def test_risk_table_puts_quee_beside_the_naive_combination():
  point = lambda cost, drop, **kw: {"test_cost": cost, "test_drop": drop, "cal_cost": cost, **kw}
  results = {"risk": {"eps": 0.1, "methods": {
      "quee": {"0.5": {"certified": point(0.6, 0.001, test_drop_max=0.003, seeds=3),
                       "z_rule": point(0.4, 0.004, test_drop_max=0.006, seeds=3),
                       "mean_only": None}},
      "ee_confidence": {"0.5": {"certified": point(0.5, 0.002), "z_rule": point(0.3, 0.005),
                                "mean_only": point(0.2, 0.009)}}}}}
  rows = report.risk_table(results).splitlines()
  assert rows[0] == ("| δ (points) | rule | quee: test cost | quee: test drop |"
                     " ee_confidence: test cost | ee_confidence: test drop |")
  assert rows[2] == ("| 0.5 | certified (risk control) | 0.6000 | 0.10 (worst seed 0.30) |"
                     " 0.5000 | 0.20 |")
  assert rows[4] == "| 0.5 | cal mean alone | none passes | — | 0.2000 | 0.90 |"
  assert report.risk_table({"methods": {}}) == ""


def test_selection_table_sets_the_cal_choice_beside_the_test_envelope():
  # On cal the dearer point looks better; on test the cheaper one is. Single points chosen on
  # cal read the dearer one's test accuracy; the test envelope takes the cheaper one's.
  points = [{"cost": 1.0, "accuracy": 0.9, "cal_cost": 1.0, "cal_accuracy": 0.9},
            {"cost": 0.5, "accuracy": 0.6, "cal_cost": 0.5, "cal_accuracy": 0.8},
            {"cost": 0.3, "accuracy": 0.7, "cal_cost": 0.3, "cal_accuracy": 0.5}]
  summary = metrics.summarize(points, 10)
  single = metrics.summarize(points, 10, mix=False)
  results = {"num_classes": 10, "methods": {"ee_confidence": {"points": points, **summary}}}
  row = report.selection_table(results).splitlines()[2]
  assert row == (f"| ee_confidence | {100 * summary['auc']:.2f} / {100 * summary['auc_16']:.2f} |"
                 f" {100 * single['auc']:.2f} / {100 * single['auc_16']:.2f} |"
                 f" {100 * summary['auc_test_envelope']:.2f} /"
                 f" {100 * summary['auc_16_test_envelope']:.2f} |")
  assert single["acc_at_budget"]["0.5"] == 0.6
  assert summary["acc_at_budget_test_envelope"]["0.5"] == 0.7
  assert report.selection_table({"methods": {}}) == ""  # results without num_classes: no table
