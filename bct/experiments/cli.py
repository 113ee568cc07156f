"""`python -m bct COMMAND ...`: BCT training, its retrieval table, the exact
compatibility curve of the linearized model, the benchmark."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import bct.experiments.bench as bench
import bct.experiments.curve as job_curve
import bct.experiments.train as job
from lqf.errors import UserError
import lqf.experiments.cli as lqf_cli
import lqf.runtime.checkpoint as checkpoint
import lqf.runtime.config as config_lib


def _train(args: argparse.Namespace, overrides: list[str]) -> None:
  cfg = config_lib.load(args.config, overrides)
  with checkpoint.overwriting(args.overwrite):
    result = job.run(cfg, args.workdir, progress=not args.no_progress)
  print(job.format_table(result))
  print(f"bct train ({result['method']}) on {result['count']} images; results in "
        f"{args.workdir}")


def _eval(args: argparse.Namespace, overrides: list[str]) -> None:
  if overrides:
    raise UserError(f"eval reads the run's own config and takes no overrides, got "
                    f"{' '.join(overrides)}")
  print(job.format_table(job.evaluate_run(args.workdir, args.independent or None)))


def _curve(args: argparse.Namespace, overrides: list[str]) -> None:
  cfg = config_lib.load(args.config, overrides)
  doc = job_curve.run(cfg, args.out)
  print(job_curve.format_table(doc))
  print(f"written: {args.out}/curve.json, curve.csv, curve.png")


COMMANDS: dict[str, Callable[[argparse.Namespace, list[str]], None]] = {
    "train": _train, "eval": _eval, "curve": _curve,
    "bench": lqf_cli.bench_command(bench)}


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m bct", description=__doc__)
  sub = p.add_subparsers(dest="command", required=True)
  lqf_cli.add_job_parser(sub, "train", "train a new embedding model compatible with an old one", "--config.bct.method=l2")
  ev = sub.add_parser("eval", help="cross-model retrieval of a finished bct train run")
  ev.add_argument("--workdir", required=True, help="the bct train run")
  ev.add_argument("--independent", default="", help="a bct train run of the same update "
                  "without the constraint (bct.method=independent): adds the update gain")
  cu = sub.add_parser("curve", help="the exact new/new against new/old curve of the "
                      "linearized model", description="Config overrides: "
                      "--config.curve.rhos=(0,0.5,1) and so on.")
  cu.add_argument("--config", required=True, help=lqf_cli.CONFIG_HELP)
  cu.add_argument("--out", required=True, help="folder for curve.json, .csv and .png")
  lqf_cli.add_bench_parser(sub, "the BCT benchmark; writes its JSON")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  return lqf_cli.dispatch(parser(), COMMANDS, argv)
