"""Saved runs: one (variant, seed) run's results (`SeedRun`) and the cache `evaluate` keeps of them.

Under save_dir, each run's predictors (orbax) go to <variant>/seed_<k> and its results beside
them as seed_<k>.json (a damaged one is fitted again, with a notice naming it);
fingerprint.txt names the tables and config they were made with, and a save_dir holding runs
for anything else is emptied before use (`claim`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import numpy as np

from quee_jax.core.progress import first_line, notice
from quee_jax.core.table import StateTable
from quee_jax.gating import predictor
from quee_jax.protocol.choice import BudgetEntry
from quee_jax.protocol.config import RESULTS_VERSION, EvalConfig
from quee_jax.protocol.fitting import predictors_path


# What `metrics.summarize` returns, as a SeedRun's JSON holds it.
SUMMARY_KEYS = ("auc", "auc_16", "min_cost", "acc_at_budget", "cost_at_budget", "curve",
                "auc_test_envelope", "auc_16_test_envelope", "acc_at_budget_test_envelope")


@dataclasses.dataclass(frozen=True)
class RunDetails:
  """What one run per evaluation also reports (`evaluate`'s diagnostics and calibration)."""

  diagnostics: dict  # split -> `diagnostics.summary`
  calibration: dict  # {"ece_test": ...}
  heads_and_predictors: float  # the exit heads' and predictors' cost at every gate

  def to_json(self) -> dict:
    return {"diagnostics": self.diagnostics, "calibration": self.calibration,
            "heads_and_predictors": self.heads_and_predictors}

  @classmethod
  def from_json(cls, d: dict) -> RunDetails:
    return cls(d["diagnostics"], d["calibration"], d["heads_and_predictors"])


@dataclasses.dataclass(frozen=True)
class SeedRun:
  """One seed of one QuEE variant: its λ sweep, curve chosen on cal, budget mode, risk control.

  Its JSON is seed_<k>.json's content and, with the seed and without details, an entry of
  results.json's methods[variant]["seeds"].
  """

  points: list[dict]   # the operating points swept, with cal and test numbers
  summary: dict        # `metrics.summarize` of the points (auc, acc_at_budget, ...)
  budget_mode: dict[str, BudgetEntry]  # budget key -> entry
  risk: dict           # `choice.risk_choices`: per δ and rule, the point chosen on cal
  predictor_epochs: int
  predictor_cost_per_gate: float
  details: RunDetails | None = None

  def to_json(self) -> dict:
    out = {"points": self.points, **self.summary,
           "budget_mode": {k: e.to_json() for k, e in self.budget_mode.items()},
           "risk": self.risk, "predictor_epochs": self.predictor_epochs,
           "predictor_cost_per_gate": self.predictor_cost_per_gate}
    if self.details is not None:
      out["details"] = self.details.to_json()
    return out

  @classmethod
  def from_json(cls, d: dict) -> SeedRun:
    details = d.get("details")
    summary = {k: d[k] for k in SUMMARY_KEYS}
    return cls(d["points"], summary,
               {k: BudgetEntry.from_json(e) for k, e in d["budget_mode"].items()}, d["risk"],
               d["predictor_epochs"], d["predictor_cost_per_gate"],
               None if details is None else RunDetails.from_json(details))

  def through_json(self) -> SeedRun:
    """This run as read back from its JSON: plain floats, lists, ... wherever it was built."""
    return SeedRun.from_json(json.loads(json.dumps(self.to_json())))


def fingerprint(fit: StateTable, cal: StateTable, test: StateTable, cfg: EvalConfig) -> str:
  """What saved runs depend on: the config, the family and each table's content."""
  h = hashlib.sha256(json.dumps([RESULTS_VERSION, dataclasses.asdict(cfg), test.family.spec()],
                                sort_keys=True, default=str).encode())
  for t in (fit, cal, test):
    features = (t.features[k] for k in sorted(t.features))
    for a in (t.labels, t.correct, t.logits, t.summary, *features):
      if a is not None:
        h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def claim(save_dir: str, stamp: str) -> None:
  """Empties save_dir unless it holds runs made with this `fingerprint` (stamp)."""
  path = os.path.join(save_dir, "fingerprint.txt")
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == stamp:
        return
  if os.path.isdir(save_dir):
    shutil.rmtree(save_dir)
  os.makedirs(save_dir)
  with open(path, "w") as f:
    f.write(stamp)


def load_run(save_dir: str, variant: str, seed: int) -> SeedRun | None:
  """The saved run of (variant, seed) in a claimed save_dir; None if there is none."""
  path = predictors_path(save_dir, variant, seed) + ".json"
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return SeedRun.from_json(json.load(f))
  except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
    # A truncated or overwritten file: the run is fitted again (deterministically) and saved over.
    notice(f"{path} is damaged ({first_line(e)}); fitting this run again")
    return None


def save_run(save_dir: str, variant: str, seed: int, run: SeedRun, params: dict) -> None:
  """Saves a run's predictors, then its results: a results file means a complete run."""
  path = predictors_path(save_dir, variant, seed)
  predictor.save(params, path)
  write_json(path + ".json", run.to_json())


def write_json(path: str, obj, indent: int | None = None) -> None:
  """Writes JSON to a temporary name and renames it: an interrupted write leaves no file."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=indent)
  os.replace(path + ".tmp", path)
