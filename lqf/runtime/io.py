"""Files that are either complete or absent: write to a temporary name, then rename.

On several hosts only the first process writes (every process computes the same
replicated results, and they share the workdir); the others skip these writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import csv
import io
import json
import os
import tempfile
from typing import Any


def is_primary() -> bool:
  """Whether this process writes the run's files (the first of several hosts)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def atomic_write_text(path: str, text: str) -> None:
  """Writes `text` to `path` so that a crash leaves the old file or the new one."""
  if not is_primary():
    return
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


def csv_text(rows: Iterable[Mapping[str, Any]], fields: Sequence[str]) -> str:
  """`rows` as CSV with the header `fields` (other keys of a row are left out)."""
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
  w.writeheader()
  w.writerows(rows)
  return buf.getvalue()


def atomic_savefig(fig: Any, path: str, dpi: int = 120) -> None:
  """Saves a matplotlib figure as PNG under a temporary name, renames it, closes it."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  if not is_primary():
    plt.close(fig)
    return
  tmp = os.path.join(os.path.dirname(os.path.abspath(path)), ".tmp-" + os.path.basename(path))
  fig.savefig(tmp, dpi=dpi, format="png")
  plt.close(fig)
  os.replace(tmp, path)


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
    if not is_primary() or not os.path.exists(self.path):
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
    if not is_primary():
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")

  def read(self) -> list[dict[str, Any]]:
    """The records, without a last line that a crash cut short."""
    if not os.path.exists(self.path):
      return []
    records = []
    with open(self.path) as f:
      for line in f:
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError:
          pass
    return records


def _plain(v: Any) -> Any:
  try:
    return float(v) if not isinstance(v, (str, int)) else v
  except TypeError:
    return str(v)
