"""Progress for long stages: a live bar on a terminal, one line per stage in a log.

A batch job's log gets one line when a stage ends ("fine-tune prsl: 100/100 in
41.2s, loss=0.120"), not hundreds of carriage-return redraws.
"""

import sys
import time

import tqdm


class _Lines:
  """tqdm's update/set_postfix/reset/close, printing one line per finished stage."""

  def __init__(self, total, desc, file):
    self._file = file
    self._start(total, desc)

  def _start(self, total, desc):
    self.total, self.desc, self.n, self._postfix, self._t0 = total, desc, 0, "", time.time()

  def update(self, n=1):
    self.n += n

  def set_postfix(self, ordered_dict=None, **kwargs):
    items = dict(ordered_dict or {}, **kwargs)
    self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

  def set_description(self, desc):
    self.desc = desc

  def _flush(self):
    if self.n or self.total:
      tail = f", {self._postfix}" if self._postfix else ""
      print(f"{self.desc}: {self.n}/{self.total} in {time.time() - self._t0:.1f}s{tail}",
            file=self._file, flush=True)

  def reset(self, total=None, desc=None):
    self._flush()
    self._start(total, desc if desc is not None else self.desc)

  def close(self):
    self._flush()
    self.n = self.total = 0


class _Bar(tqdm.tqdm):
  def reset(self, total=None, desc=None):  # pylint: disable=arguments-differ
    if desc is not None:
      self.set_description(desc)
    super().reset(total=total)


def bar(total, desc, *, enabled=True, initial=0, file=None):
  """A progress bar when `file` (default stdout) is a terminal, else stage lines.

  Args:
    total: units in this stage.
    desc: the stage's name.
    enabled: False prints nothing at all.
    initial: units already done (a resumed run).
  """
  file = file or sys.stdout
  if not enabled:
    return _Bar(total=total, disable=True)
  if getattr(file, "isatty", lambda: False)():
    return _Bar(total=total, initial=initial, desc=desc, file=file, dynamic_ncols=True)
  lines = _Lines(total, desc, file)
  lines.n = initial
  return lines
