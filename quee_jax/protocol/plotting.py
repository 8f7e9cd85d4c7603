"""Accuracy vs counted cost on a log axis, every method of a results dict.

Each method's curve is its points chosen on cal, one per budget of the auc, at their test cost
and accuracy (`metrics.summarize`'s curve); the oracles, which choose on test by definition,
are drawn as their test envelope.
"""

from __future__ import annotations

from matplotlib.figure import Figure

from quee_jax.protocol import metrics

STYLE = {
    "quee": dict(color="C3", lw=2.2, marker="o", ms=3, zorder=5),
    "quee_raw_targets": dict(color="C1", lw=1.2, ls="--"),
    "quee_exit_only": dict(color="C4", lw=1.2, ls="--"),
    "quee_quant_only": dict(color="C5", lw=1.2, ls="--"),
    "ee_confidence": dict(color="C0", lw=2.0),
    "static": dict(color="k", lw=0, marker="s", ms=5),
    "oracle_consistency": dict(color="C2", lw=1.2, ls=":"),
    "oracle_path": dict(color="C7", lw=1.2, ls=":"),
}


def plot_curves(results: dict, path: str) -> None:
  """Writes the accuracy-cost figure (PNG) to `path`."""
  # A bare Figure draws with Agg whatever pyplot's backend is, and leaves pyplot
  # (e.g. a notebook's inline plots) alone.
  fig = Figure(figsize=(7.5, 5))
  ax = fig.subplots()
  for name, m in results["methods"].items():
    if name.startswith("ee_confidence@"):
      style = dict(lw=0.8, alpha=0.45)
    else:
      style = STYLE.get(name, dict(lw=1))
    if "curve" in m:
      cost, acc = [c for _, c, _ in m["curve"]], [a for _, _, a in m["curve"]]
      steps = "default"
    else:
      pts = metrics.pareto(m["points"])
      cost, acc = [p["cost"] for p in pts], [p["accuracy"] for p in pts]
      steps = "steps-post" if style.get("lw", 1) else "default"
    ax.plot(cost, [100 * a for a in acc], label=f"{name} (auc {100 * m['auc']:.2f})",
            drawstyle=steps, **style)
  full = results["full_model"]
  ax.axhline(100 * full["accuracy"], color="grey", lw=0.6, ls="--")
  ax.set_xscale("log", base=2)
  ax.set_xlim(1 / 80, 1.1)
  # The lowest accuracy a method reaches at a reported budget (not the chance level scored
  # where it has no point there).
  lo = 100 * min(a for m in results["methods"].values() for b, a in m["acc_at_budget"].items()
                 if (m.get("cost_at_budget") or {}).get(b, 0) is not None)
  hi = 100 * max(p["accuracy"] for m in results["methods"].values() for p in m["points"])
  ax.set_ylim(max(0, lo - 5), min(100.5, hi + 1.5))
  ax.set_xlabel(f"mean counted cost ({results['cost_unit']}, full model = 1)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(f"{results.get('dataset', '')}: ladder {', '.join(results['ladder'])}, "
               f"{results['family']}")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=130)
