"""What the update jobs (`pc`, `bct`) share about their old model: training it once per
process and setting, and refusing an old run whose labels may mean something else."""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
import json
from typing import Any, TypeVar

from lqf.errors import require
import lqf.runtime.config as config_lib

T = TypeVar("T")


def plain(x: Any) -> Any:
  """A ConfigDict as a plain dict (anything else as it is), for a cache key."""
  return config_lib.to_dict(x) if hasattr(x, "to_json") else x


def memoized(cache: MutableMapping[str, T], parts: Sequence[Any], make: Callable[[], T]) -> T:
  """`cache`'s value for the settings `parts`, made by `make()` the first time. In-memory
  old models are trained deterministically, so every command of a process with the same
  settings can share one."""
  key = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
  if key not in cache:
    cache[key] = make()
  return cache[key]


def check_same_dataset(old: Mapping[str, Any], old_name: str, new_name: str) -> None:
  """An old model loaded from `old["workdir"]` must have been trained on the new data's
  dataset, unless `old["allow_other_dataset"]` says its labels mean the same."""
  require(old_name == new_name or old["allow_other_dataset"],
          f"the old model in {old['workdir']!r} was trained on {old_name!r}, the new data is "
          f"{new_name!r}: their label sets may differ. Use an old model of {new_name!r}, or "
          "--config.old.allow_other_dataset=True if the labels mean the same")
