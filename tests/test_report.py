"""report.md: budgets a method cannot reach are shown as such, not as chance accuracy."""

from quee_jax.protocol import report


def _method(min_costs, acc):
  seeds = [{"seed": i, "min_cost": c} for i, c in enumerate(min_costs)]
  return {"auc": 0.8, "auc_16": 0.8, "min_cost": sum(min_costs) / len(min_costs),
          "auc_spread": 0.0, "auc_16_spread": 0.0, "acc_at_budget": acc, "seeds": seeds}


def test_unreachable_budgets_are_a_dash_with_a_footnote():
  results = {"methods": {
      "quee": _method([0.1], {"0.0625": 0.1, "0.5": 0.9}),  # 0.1 = 1/num_classes: no point
      "static": _method([0.05, 0.3], {"0.0625": 0.45, "0.5": 0.85}),  # one seed reaches 1/16
      "ee_confidence": {"auc": 0.7, "auc_16": 0.7, "min_cost": 0.5,  # no seeds: its own min
                        "acc_at_budget": {"0.0625": 0.1, "0.5": 0.8}}}}
  table = report.methods_table(results)
  rows = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ")}
  assert "| 0.1000 | — | 90.00 |" in rows["quee"] and "10.00" not in rows["quee"]
  assert "| 45.00 † | 85.00 |" in rows["static"]
  assert "| — | 80.00 |" in rows["ee_confidence"]
  assert "— : the method has no operating point at or below this budget" in table
  assert "† : only some seeds" in table


def test_reachable_budgets_have_no_footnote():
  results = {"methods": {"quee": _method([0.01], {"0.0625": 0.7, "0.5": 0.9})}}
  table = report.methods_table(results)
  assert "| 70.00 | 90.00 |" in table and "—" not in table and "†" not in table
