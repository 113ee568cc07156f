"""What every benchmark shares: the JSON document's `meta` block and `summary` of a metric
over seeds, the pretrained runs benchmarks start from (made when missing), interleaved
step timing, and the printed table.

Every benchmark writes one JSON file:
`{"meta": {command, seeds, device, date, versions}, "arms": {arm: {metric: {mean, std,
values}}}, ...}`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import datetime
import importlib.metadata
import os
import platform
import sys
import time
from typing import Any

import jax
import numpy as np
import optax

from lqf.errors import UserError, require
import lqf.experiments.pretrain as pretrain
from lqf.models.classifier import Classifier
import lqf.runtime.config as config_lib

TRANSFER_CONFIG = "digits_transfer"


def summary(values: Sequence[float]) -> dict[str, Any]:
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
          "values": [float(x) for x in v]}


def meta(command: str, seeds: Sequence[int]) -> dict[str, Any]:
  versions = {p: importlib.metadata.version(p) for p in
              ("jax", "jaxlib", "flax", "optax", "kfac-jax", "orbax-checkpoint",
               "tensorflow-datasets", "graceful")}
  dev = jax.devices()[0]
  return {"command": command, "seeds": list(seeds),
          "device": f"{dev.platform}: {dev.device_kind} ({platform.processor() or platform.machine()}, "
                    f"{os.cpu_count()} cores)",
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "versions": versions, "python": sys.version.split()[0]}


# Quick mode is a smoke test of the machinery: a 4-channel ResNet-8 on 8×8 images, whose
# programs compile in seconds. Every bench's own quick overrides carry QUICK_DATA so that
# its task reads images of the size its quick source model saw.
QUICK_DATA = ("data.image_size=8",)
QUICK_PRETRAIN = ("train.steps=20", "train.checkpoint_every=10", "model.width=4",
                  "model.depth=8", *QUICK_DATA)


def pretrained_run(spec: Mapping[str, Any], *, suffix: str = "",
                   overrides: Sequence[str] = (), progress: bool = True) -> str:
  """The workdir of a `pretrained` block (`{workdir, config}`, see
  `lqf.runtime.config.pretrained_config`) with `suffix` appended, after pretraining
  `spec["config"]` (with `overrides`) into it if it holds no finished pretraining run."""
  workdir = spec["workdir"] + suffix
  cfg = config_lib.load(spec["config"], list(overrides)) if spec["config"] else None
  try:
    pretrain.load_pretrained(workdir)
  except UserError:
    require(cfg is not None, f"{workdir!r} holds no finished pretraining run, and its "
            "`pretrained.config` is empty (imported weights): run `python -m lqf "
            f"import-weights --workdir {workdir} ...` first")
  else:
    if cfg is not None:  # A run of other settings (an older quick model, say) is refused.
      pretrain.check_same_run(cfg, workdir, fix=f"delete {workdir} to pretrain it again, "
                              "or set that pretrained.workdir to another directory")
    return workdir
  print(f"pretraining {spec['config']} into {workdir} ...", file=sys.stderr)
  pretrain.pretrain(cfg, workdir, progress=progress)
  return workdir


def ensure_pretrained(spec: Mapping[str, Any], quick: bool
                      ) -> tuple[dict[str, Any], Classifier]:
  """(its config, its classifier) of the finished pretraining run of a `pretrained` block,
  pretrained first if needed; `quick` uses a `_quick` run of 20 steps instead."""
  workdir = pretrained_run(spec, suffix="_quick" if quick else "",
                           overrides=QUICK_PRETRAIN if quick else ())
  print(f"pretrained model: {workdir}", file=sys.stderr)
  return pretrain.load_pretrained(workdir)


def backbone_overrides(cfg: Mapping[str, Any], keys: Sequence[str], quick: bool
                       ) -> list[str]:
  """`KEY.workdir=DIR` for each `pretrained` block at a dotted `KEY` of `cfg`, with DIR
  its finished pretraining run (see `pretrained_run`; `_quick` runs in quick mode)."""
  out = []
  for key in keys:
    spec = cfg
    for part in key.split("."):
      spec = spec[part]
    workdir = pretrained_run(spec, suffix="_quick" if quick else "",
                             overrides=QUICK_PRETRAIN if quick else ())
    out.append(f"{key}.workdir={workdir}")
  return out


class ReleaseCompiled:
  """Called after each run of a benchmark; clears JAX's caches every `every` calls.

  Every run compiles new closures, and a long benchmark that kept them all ran out of
  memory LLVM could map (a segfault after about an hour). Clearing after every run made
  each run trace, lower and compile again what the one before had, tiny eager ops
  included (README's quick lqf benchmarks: 104 s with it, 65 s without), so the programs
  of a few runs are kept.
  """

  def __init__(self, every: int = 16):
    self.every, self._runs = every, 0

  def __call__(self) -> None:
    self._runs += 1
    if self._runs % self.every == 0:
      jax.clear_caches()


def time_steps(fns: Mapping[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
  """Seconds per call of each function, interleaved so that machine noise hits all alike."""
  for fn in fns.values():
    jax.block_until_ready(fn())  # Compile.
  times: dict[str, list[float]] = {n: [] for n in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t0)
  return times


def sgd_step_timer(loss: Callable[..., jax.Array], variables: Any, *rest: Any
                   ) -> tuple[Callable[[], Any], Any]:
  """(a call of one SGD-with-momentum step of `loss(variables, *rest)`, its compiled
  executable); the call always starts from the same state, so it can be timed again."""
  tx = optax.sgd(1e-3, momentum=0.9)

  @jax.jit
  def step(v, s, *r):
    g = jax.grad(loss)(v, *r)
    u, s = tx.update(g, s, v)
    return optax.apply_updates(v, u), s

  state = tx.init(variables)
  return (lambda: step(variables, state, *rest)), \
      step.lower(variables, state, *rest).compile()


def format_table(doc: Mapping[str, Any]) -> str:
  lines = [f"{'arm':<40} {'metric':<18} {'mean ± std':>22}"]
  for arm, metrics in doc["arms"].items():
    for metric, a in metrics.items():
      scale = 100 if metric == "accuracy" else 1
      if a["mean"] is None:
        lines.append(f"{arm:<40} {metric:<18} {'not reached':>22}")
        continue
      extra = f" ({a['not_reached']} not reached)" if a.get("not_reached") else ""
      lines.append(f"{arm:<40} {metric:<18} {scale * a['mean']:11.4g} ± "
                   f"{scale * a['std']:8.3g}{extra}")
  if "goals" in doc:
    lines.append("goals: " + ", ".join(f"{k}={v}" for k, v in doc["goals"].items()))
  return "\n".join(lines)
