"""`python -m pc COMMAND --config NAME [--workdir DIR | --out DIR]
[--config.key=value ...]`: PC training, the exact trade-off, the benchmark."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import lqf.experiments.cli as lqf_cli
import lqf.runtime.checkpoint as checkpoint
import lqf.runtime.config as config_lib
import pc.experiments.bench as bench
import pc.experiments.curve as job_curve
import pc.experiments.train as job


def _train(args: argparse.Namespace, overrides: list[str]) -> None:
  cfg = config_lib.load(args.config, overrides)
  with checkpoint.overwriting(args.overwrite):
    result = job.run(cfg, args.workdir, progress=not args.no_progress)
  r = result["eval"]["rates"]
  print(f"pc train ({result['method']}): eval accuracy {result['eval']['accuracy']:.4f} on "
        f"{result['eval']['count']} images; ER_old {100 * r['ER_old']:.2f}%, NFR "
        f"{100 * r['NFR']:.2f}%, PFR {100 * r['PFR']:.2f}%, relative NFR {r['rel_NFR']:.3f}, "
        f"NFI {r['NFI']:.3f}; results in {args.workdir}")


def _curve(args: argparse.Namespace, overrides: list[str]) -> None:
  cfg = config_lib.load(args.config, overrides)
  doc = job_curve.run(cfg, args.out, progress=not args.no_progress)
  print(job_curve.format_table(doc))
  print(f"written: {args.out}/curve.json, curve.csv, curve.png")


COMMANDS: dict[str, Callable[[argparse.Namespace, list[str]], None]] = {
    "train": _train, "curve": _curve, "bench": lqf_cli.bench_command(bench)}


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m pc", description=__doc__)
  sub = p.add_subparsers(dest="command", required=True)
  lqf_cli.add_job_parser(sub, "train", "train a new model against an old one", "--config.pc.method=fd_lm")
  to = sub.add_parser("curve", help="the exact ER-versus-NFR curve of the linearized model",
                      description="Config overrides: --config.curve.rhos=(0,0.5,1) and so on.")
  to.add_argument("--config", required=True, help=lqf_cli.CONFIG_HELP)
  to.add_argument("--out", required=True, help="folder for curve.json, .csv and .png")
  to.add_argument("--no_progress", action="store_true", help="no progress bar")
  lqf_cli.add_bench_parser(sub, "the PC benchmark; writes its JSON")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  return lqf_cli.dispatch(parser(), COMMANDS, argv)
