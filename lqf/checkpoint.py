"""Orbax checkpoints of a training state, and the guard that keeps one run per workdir."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from lqf import config as config_lib
from lqf.errors import UserError, require
from lqf.io import atomic_write_json

CONFIG_FILE = "config.json"


def manager(directory: str, *, keep: int = 3) -> ocp.CheckpointManager:
  """A manager whose saves are committed only when complete (orbax writes to a temporary
  directory and renames), keeping the `keep` most recent steps."""
  return ocp.CheckpointManager(os.path.abspath(directory),
                               options=ocp.CheckpointManagerOptions(max_to_keep=keep))


def save(mgr: ocp.CheckpointManager, step: int, state: Any) -> None:
  mgr.save(step, args=ocp.args.StandardSave(state))


def restore_latest(mgr: ocp.CheckpointManager, like: Any) -> tuple[Any, int] | None:
  """Restores the latest step into the structure, shapes and dtypes of `like`."""
  step = mgr.latest_step()
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  try:
    state = mgr.restore(step, args=ocp.args.StandardRestore(abstract))
  except (ValueError, KeyError) as e:
    raise UserError(f"the checkpoint at step {step} in {mgr.directory} does not fit this "
                    f"model ({e}); use a new --workdir") from None
  return state, step


def claim_workdir(workdir: str, cfg: dict[str, Any], *, command: str,
                  may_change: tuple[str, ...] = ()) -> None:
  """Records `cfg` in `workdir/config.json`, or checks that the run already there
  is the same (apart from the `may_change` keys) so that it can be resumed.

  Raises:
    UserError: the workdir holds another command's or another config's run, or
      cannot be written.
  """
  record = {"command": command, "config": cfg}
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    require(old.get("command") == command,
            f"workdir {workdir!r} holds a {old.get('command')!r} run, not {command!r}: "
            "use a new --workdir")
    changed = config_lib.diff(old["config"], cfg, ignore=may_change)
    arch = [k for k in changed if k.startswith("model.")]
    require(not arch, f"workdir {workdir!r} holds a checkpoint of a different architecture "
            f"({', '.join(arch)} differ): use a new --workdir")
    require(not changed, f"workdir {workdir!r} holds a run of a different config "
            f"({', '.join(changed)} differ): use a new --workdir or the same config")
  try:
    os.makedirs(workdir, exist_ok=True)
    atomic_write_json(path, record)
  except OSError as e:
    raise UserError(f"workdir {workdir!r} cannot be written ({e.strerror}): choose a "
                    "writable --workdir") from None


def read_run(workdir: str, hint: str = "") -> tuple[str | None, dict[str, Any]]:
  """(command, config) of the run recorded in `workdir`; `hint` says how to make one."""
  path = os.path.join(workdir, CONFIG_FILE)
  require(os.path.exists(path), f"no run in {workdir!r} (no {CONFIG_FILE})"
          + (f": {hint}" if hint else ""))
  with open(path) as f:
    record = json.load(f)
  return record.get("command"), record["config"]
