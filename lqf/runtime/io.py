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
import struct
import tempfile
import time
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
  """Metrics as JSON lines (`metrics.jsonl` in the workdir), one record per event, and
  the same numbers as TensorBoard scalars in `tensorboard/` beside it (event files
  written by tensorboardX, no TensorFlow), tagged `split/name` (`train/loss`, ...).

  A resumed run first drops the records past its restored step, so the file never holds
  the same step twice; its event file starts with TensorBoard's purge marker at the
  next step, which makes TensorBoard discard the earlier files' later events.
  """

  def __init__(self, path: str, tensorboard: bool = True):
    self.path = path
    self.tensorboard_dir = (os.path.join(os.path.dirname(os.path.abspath(path)),
                                         "tensorboard") if tensorboard else None)
    self._writer = None
    self._purge_step: int | None = None

  def truncate_after(self, step: int) -> None:
    self._purge_step = int(step) + 1
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
    self._write_scalars(record)

  def _write_scalars(self, record: Mapping[str, Any]) -> None:
    if self.tensorboard_dir is None:
      return
    if self._writer is None:
      # Imported on first use: a run that logs nothing does not pay for it. File names
      # carry whole seconds only and a file of the same name is replaced: the suffix
      # keeps a rerun within the same second from erasing the run before it.
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._writer = SummaryWriter(self.tensorboard_dir, purge_step=self._purge_step,
                                   flush_secs=30, filename_suffix=f".{time.time_ns():020d}")
    prefix = f"{record['split']}/" if isinstance(record.get("split"), str) else ""
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
        self._writer.add_scalar(prefix + key, value, record["step"])
    self._writer.flush()  # An event cut short by a crash is skipped by readers.

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

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


def read_tensorboard_scalars(directory: str) -> dict[str, dict[int, float]]:
  """Every scalar in the event files of `directory`, as `{tag: {step: value}}`, with
  TensorBoard's rule for a purge marker at step s (events of earlier files at steps ≥ s
  are dropped). Reads the TFRecord framing itself; a record cut short ends its file."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out: dict[str, dict[int, float]] = {}
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      end = pos + 12 + length + 4
      if end > len(data):
        break
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos = end
      if event.HasField("session_log") and \
          event.session_log.status == event_pb2.SessionLog.START:
        for steps in out.values():
          for s in [s for s in steps if s >= event.step]:
            del steps[s]
      for v in event.summary.value:
        out.setdefault(v.tag, {})[int(event.step)] = float(v.simple_value)
  return out


def _plain(v: Any) -> Any:
  try:
    return float(v) if not isinstance(v, (str, int)) else v
  except TypeError:
    return str(v)
