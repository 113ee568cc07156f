"""Files that are either complete or absent: write to a temporary name, then rename."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def atomic_write_text(path: str, text: str) -> None:
  """Writes `text` to `path` so that a crash leaves the old file or the new one."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_write_json(path: str, obj: Any) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class MetricsLog:
  """Metrics as JSON lines (`metrics.jsonl` in the workdir), one record per event.

  A resumed run first drops the records past its restored step, so the file never holds
  the same step twice.
  """

  def __init__(self, path: str):
    self.path = path

  def truncate_after(self, step: int) -> None:
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      keep = []
      for line in f:
        try:
          if json.loads(line)["step"] <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
        except (json.JSONDecodeError, KeyError):
          pass  # A line cut short by a crash.
    atomic_write_text(self.path, "".join(keep))

  def write(self, step: int, **metrics: Any) -> None:
    record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")

  def read(self) -> list[dict[str, Any]]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [json.loads(line) for line in f if line.strip()]


def _plain(v: Any) -> Any:
  try:
    return float(v) if not isinstance(v, (str, int)) else v
  except TypeError:
    return str(v)
