"""Orbax checkpoints of a training state, and the guard that keeps one run per workdir."""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import contextvars
import json
import os
import shutil
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lqf.errors import UserError, require
import lqf.runtime.config as config_lib
from lqf.runtime.io import atomic_write_json

CONFIG_FILE = "config.json"


def manager(directory: str, *, keep: int = 3) -> ocp.CheckpointManager:
  """A manager whose saves are committed only when complete (orbax writes to a temporary
  directory and renames), keeping the `keep` most recent steps."""
  return ocp.CheckpointManager(os.path.abspath(directory),
                               options=ocp.CheckpointManagerOptions(max_to_keep=keep))


def save(mgr: ocp.CheckpointManager, step: int, state: Any) -> None:
  mgr.save(step, args=ocp.args.StandardSave(state))


def restore_latest(mgr: ocp.CheckpointManager, like: Any) -> tuple[Any, int] | None:
  """Restores the latest readable step into the structure, shapes, dtypes and shardings
  of `like`; None when the directory holds no checkpoint.

  A latest step that cannot be read (a truncated or corrupted file, a crash while it was
  written) is skipped with a warning and the step before it is restored; the run then
  redoes the lost steps. If no step can be read, the error says so.
  """
  steps = sorted(mgr.all_steps(), reverse=True)
  if not steps:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  failures = []
  for step in steps:
    try:
      state = mgr.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # pylint: disable=broad-except  # Orbax raises many kinds.
      failures.append((step, f"{type(e).__name__}: {_first_line(e)}"))
      print(f"warning: the checkpoint at step {step} in {mgr.directory} cannot be read "
            f"({failures[-1][1]}); trying the one before it", file=sys.stderr)
      continue
    _check_finite(state, step, mgr.directory)
    return state, step
  latest, why = failures[0]
  raise UserError(f"no checkpoint in {mgr.directory} can be restored into this model (step "
                  f"{latest}: {why}): if the run's config changed, use a new --workdir; "
                  "if its files are damaged, delete the checkpoints folder to start over")


def _first_line(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return text[0][:200] if text else ""


def _check_finite(state: Any, step: int, directory: Any) -> None:
  """A checkpoint never holds NaN (training stops before saving one): if it does, the
  file was altered."""
  for leaf in jax.tree.leaves(state):
    arr = np.asarray(leaf)
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
      raise UserError(f"the checkpoint at step {step} in {directory} holds NaN or infinite "
                      "values; delete that step's folder to resume from the one before it")


# The files a run writes in its workdir; `--overwrite` removes these and nothing else.
RUN_FILES = (CONFIG_FILE, "checkpoints", "metrics.jsonl", "final_metrics.json", "solution",
             "solution.json", "old_logits.npy", "import_report.json")
_OVERWRITE: contextvars.ContextVar[bool] = contextvars.ContextVar("overwrite", default=False)


@contextlib.contextmanager
def overwriting(enabled: bool = True) -> Iterator[None]:
  """Within this block `claim_workdir` replaces a run of another config or command
  instead of refusing it (the commands' `--overwrite` flag). The old run's files are
  removed only once the new config has passed its checks."""
  token = _OVERWRITE.set(enabled)
  try:
    yield
  finally:
    _OVERWRITE.reset(token)


def _remove_run(workdir: str) -> None:
  for name in RUN_FILES:
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)


def claim_workdir(workdir: str, cfg: dict[str, Any], *, command: str,
                  may_change: tuple[str, ...] = ()) -> None:
  """Records `cfg` in `workdir/config.json`, or checks that the run already there
  is the same (apart from the `may_change` keys) so that it can be resumed. Inside
  `overwriting()`, a different run there is removed first.

  Raises:
    UserError: the workdir holds another command's or another config's run, or
      cannot be written.
  """
  record = {"command": command, "config": cfg}
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path) and _OVERWRITE.get():
    with open(path) as f:
      old = json.load(f)
    if old.get("command") != command or config_lib.diff(old["config"], cfg,
                                                         ignore=may_change):
      print(f"--overwrite: removing the {old.get('command')!r} run in {workdir}",
            file=sys.stderr)
      _remove_run(workdir)
  if os.path.exists(path):
    check_same_run(workdir, cfg, command=command, may_change=may_change)
  try:
    os.makedirs(workdir, exist_ok=True)
    atomic_write_json(path, record)
  except OSError as e:
    raise UserError(f"workdir {workdir!r} cannot be written ({e.strerror}): choose a "
                    "writable --workdir") from None


def check_same_run(workdir: str, cfg: dict[str, Any], *, command: str,
                   may_change: tuple[str, ...] = (), fix: str | None = None) -> None:
  """Checks that the run recorded in `workdir` is `command` with `cfg` (apart from the
  `may_change` keys). `fix` replaces the advice the errors end with (a new workdir, or
  `--overwrite`), for callers that reuse a run rather than resume one.

  Raises:
    UserError: it is another command's run, or another config's (an architecture that
      differs is named as such).
  """
  with open(os.path.join(workdir, CONFIG_FILE)) as f:
    old = json.load(f)
  again = fix or "use a new --workdir (or --overwrite to replace it)"
  require(old.get("command") == command,
          f"workdir {workdir!r} holds a {old.get('command')!r} run, not {command!r}: {again}")
  changed = config_lib.diff(old["config"], cfg, ignore=may_change)
  arch = [k for k in changed if k.startswith("model.")]
  require(not arch, f"workdir {workdir!r} holds a checkpoint of a different architecture "
          f"({', '.join(arch)} differ): {again}")
  require(not changed, f"workdir {workdir!r} holds a run of a different config "
          f"({', '.join(changed)} differ): " + (fix or "use a new --workdir or the same "
                                                "config (or --overwrite to replace it)"))


def read_run(workdir: str, hint: str = "") -> tuple[str | None, dict[str, Any]]:
  """(command, config) of the run recorded in `workdir`; `hint` says how to make one."""
  path = os.path.join(workdir, CONFIG_FILE)
  require(os.path.exists(path), f"no run in {workdir!r} (no {CONFIG_FILE})"
          + (f": {hint}" if hint else ""))
  with open(path) as f:
    record = json.load(f)
  return record.get("command"), record["config"]
