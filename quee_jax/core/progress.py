"""What a person reads while a run goes: progress of a long loop, and notices.

`notice` prints the one line that says a file was damaged or stale and what is
done about it (`first_line` gives the reason out of an exception).

tqdm(disable=None) draws nothing when stderr is not a terminal, so a run whose
output goes to a file showed no progress at all; `Progress` draws the bar on a
terminal and logs plain lines elsewhere.
"""

from __future__ import annotations

import logging
import sys
import time

import numpy as np
from tqdm.auto import tqdm

# Without a terminal (a log file), a plain progress line this often: every PROGRESS_FRACTION of
# the steps or every PROGRESS_SECONDS, whichever comes first.
PROGRESS_FRACTION = 0.1
PROGRESS_SECONDS = 60.0


def _is_terminal(stream) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):  # no isatty, or a closed stream
    return False


class Progress:
  """Progress of a loop of `total` steps, shown where the output goes.

  On a terminal, a tqdm bar (it redraws in place). Elsewhere `logger` gets a plain
  INFO line every PROGRESS_FRACTION of the steps or PROGRESS_SECONDS, and at the end.
  terminal: None asks whether stderr is one (where tqdm draws).
  """

  def __init__(self, total: int, desc: str, *, logger: logging.Logger, initial: int = 0,
               unit: str = "step", enabled: bool = True, terminal: bool | None = None):
    self.total, self.desc, self.unit, self.n = total, desc, unit, initial
    self.logger = logger
    terminal = _is_terminal(sys.stderr) if terminal is None else terminal
    self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False,
                    disable=not (enabled and terminal))
    self.lines = enabled and not terminal
    self.t0 = self.last_t = time.time()
    self.start = self.last_n = initial
    self.postfix: dict[str, str] = {}

  def update(self, n: int = 1, **postfix: str) -> None:
    """n more steps done; postfix: short name -> value shown beside the count."""
    self.n += n
    self.postfix = postfix or self.postfix
    self.bar.update(n)
    if postfix:
      self.bar.set_postfix(postfix)
    if not self.lines:
      return
    now = time.time()
    every = max(1, int(np.ceil(PROGRESS_FRACTION * self.total)))
    if (self.n >= self.total or self.n - self.last_n >= every
        or now - self.last_t >= PROGRESS_SECONDS):
      self._line(now)

  def _line(self, now: float) -> None:
    done, secs = self.n - self.start, now - self.t0
    left = (f", ~{secs / done * (self.total - self.n):.0f}s left"
            if 0 < done and self.n < self.total else "")
    extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
    pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
    self.logger.info("%s: %s %d/%d%s, %.0fs%s%s", self.desc, self.unit, self.n, self.total, pct,
                     secs, left, extra)
    self.last_n, self.last_t = self.n, now

  def close(self) -> None:
    self.bar.close()

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def notice(message: str) -> None:
  """One line a person reads: a damaged or stale file and what is done about it."""
  print(f"notice: {message}", flush=True)


def first_line(error: Exception) -> str:
  """The first line of an exception's message (its type's name if it has none)."""
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__
