"""`python -m lqf bench NAME`: each benchmark writes one JSON document (see `common`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lqf.errors import UserError
import lqf.experiments.bench.common as common
import lqf.experiments.bench.solve as solve
import lqf.experiments.bench.throughput as throughput
import lqf.experiments.bench.transfer as transfer
from lqf.runtime.io import atomic_write_json

__all__ = ["NAMES", "common", "run", "solve", "throughput", "transfer"]

NAMES = ("transfer", "accuracy", "cost", "solve", "throughput")


def run(name: str, *, json_path: str, seeds: int, quick: bool,
        overrides: Sequence[str] = (), shots: Sequence[int] | None = None,
        config: str = common.TRANSFER_CONFIG) -> dict[str, Any]:
  """Runs benchmark `name` on the transfer task of `config` (all but throughput) and
  writes its JSON document to `json_path` atomically."""
  if seeds < 1:
    raise UserError(f"--seeds must be at least 1, got {seeds}")
  command = " ".join(["python -m lqf bench", name, "--json", json_path, "--seeds", str(seeds)]
                     + (["--config", config] if config != common.TRANSFER_CONFIG else [])
                     + (["--shots", ",".join(map(str, shots))] if shots else [])
                     + (["--quick"] if quick else [])
                     + [f"--config.{o.removeprefix('--').removeprefix('config.')}"
                        for o in overrides])
  if name == "transfer":
    result = transfer.transfer(seeds=seeds, quick=quick, overrides=overrides, config=config,
                               shots=shots)
    result["goals"] = transfer.transfer_goals(result)
  elif name == "cost":
    result = transfer.cost(seeds=seeds, quick=quick, overrides=overrides, config=config)
  elif name == "accuracy":
    result = transfer.accuracy(seeds=seeds, quick=quick, overrides=overrides, shots=shots,
                               config=config)
    result["goals"] = transfer.accuracy_goals(result)
  elif name == "solve":
    result = solve.run(seeds=seeds, quick=quick, shots=shots, overrides=overrides,
                       config=config)
  elif name == "throughput":
    result = throughput.run(seeds=seeds, quick=quick)
  else:
    raise UserError(f"unknown benchmark {name!r}: use transfer, accuracy, cost, solve or "
                    "throughput")
  doc = {"meta": common.meta(command, range(seeds)), **result}
  atomic_write_json(json_path, doc)
  return doc
