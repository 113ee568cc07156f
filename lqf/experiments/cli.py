"""`python -m lqf COMMAND --config NAME --workdir DIR [--config.key=value ...]`."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import sys
from types import ModuleType
from typing import Any

from lqf.errors import UserError
import lqf.experiments.bench as bench
import lqf.experiments.finetune as job_finetune
import lqf.experiments.import_weights as import_weights
import lqf.experiments.pretrain as pretrain
import lqf.experiments.solve as job_solve
import lqf.runtime.checkpoint as checkpoint
import lqf.runtime.config as config_lib

JOBS = {"pretrain": pretrain.pretrain, "finetune": job_finetune.run, "solve": job_solve.run}


def _train_job(args: argparse.Namespace, overrides: list[str]) -> None:
  """`pretrain` or `finetune`: load the config, run the job, print its final accuracy."""
  job = JOBS[args.command]
  cfg = config_lib.load(args.config, overrides)
  with checkpoint.overwriting(args.overwrite):
    result = job(cfg, args.workdir, progress=not args.no_progress)
  name = args.command + (f" ({result['method']})" if "method" in result else "")
  print(f"{name}: eval accuracy {result['eval']['accuracy']:.4f} on "
        f"{result['eval']['count']} images (train {result['train']['accuracy']:.4f}); "
        f"results in {args.workdir}")
  if "optimality" in result:
    o = result["optimality"]
    print(f"objective {o['objective']:.6g}, exact optimum {o['optimum']:.6g} "
          f"({o['solver']}): relative gap {o['relative_gap']:.3g}")
  if "iterations" in result:
    print(f"optimum {result['objective']:.6g} after {result['iterations']} iterations in "
          f"{result['seconds']:.1f} s (converged: {result['converged']})")


# The demo's --quick runs: the benchmarks' quick source model, evaluated halfway too.
DEMO_QUICK_PRETRAIN = (*bench.common.QUICK_PRETRAIN, "train.eval_every=10")
DEMO_QUICK_FINETUNE = (*bench.common.QUICK_DATA, "lqf.steps=3", "lqf.scope=last_stage",
                       "finetune.steps=10", "probe.steps=20")


def _demo(args: argparse.Namespace, overrides: list[str]) -> None:
  """Pretrain (or reuse), then LQF, nonlinear fine-tuning and a linear probe, side by side."""
  if overrides:
    raise UserError(f"demo takes no config overrides, got {' '.join(overrides)}")
  root = args.workdir
  # --quick: the same jobs on 8×8 images, a 4-channel network and a few steps each, in
  # runs of their own so that they never meet a full demo's.
  pre_tiny, ft_tiny, tag = (DEMO_QUICK_PRETRAIN, DEMO_QUICK_FINETUNE, "_quick") \
      if args.quick else ((), (), "")
  pre = config_lib.load("digits_pretrain", pre_tiny)
  pre_dir = f"{root}/pretrain{tag}"
  print(f"1/2 pretraining on clean digits into {pre_dir} (reused when finished)")
  source = pretrain.pretrain(pre, pre_dir, progress=not args.no_progress)
  rows = [("source model, clean test", source["eval"]["accuracy"])]
  print("2/2 adapting to 5 shots a class of shifted, noisy digits")
  for method in job_finetune.METHODS:
    cfg = config_lib.load("digits_finetune",
                          [f"method={method}", f"pretrained.workdir={pre_dir}", *ft_tiny])
    result = job_finetune.run(cfg, f"{root}/{method}{tag}", progress=not args.no_progress)
    rows.append((f"{method}, target test", result["eval"]["accuracy"]))
  print(f"\n{'model':<28} accuracy")
  for name, acc in rows:
    print(f"{name:<28} {100 * acc:6.2f} %")
  print("(one few-shot subset; `python -m lqf bench accuracy` gives means over seeds)")


def _bench(args: argparse.Namespace, overrides: list[str]) -> None:
  if overrides and args.name == "throughput":
    raise UserError(f"bench throughput takes no config overrides, got {' '.join(overrides)}")
  try:
    shots = [int(v) for v in args.shots.split(",")] if args.shots else None
  except ValueError:
    raise UserError(f"--shots takes comma-separated integers, got {args.shots!r}") from None
  result = bench.run(args.name, json_path=args.json, seeds=args.seeds, quick=args.quick,
                     shots=shots, config=args.config, overrides=overrides)
  print(bench.common.format_table(result))


def _import_weights(args: argparse.Namespace, overrides: list[str]) -> None:
  """Torchvision/timm ResNet weights -> a finished pretraining run in --workdir."""
  if overrides:
    raise UserError(f"import-weights takes no config overrides, got {' '.join(overrides)}")
  report = import_weights.import_run(args.weights, args.workdir, activation=args.activation,
                              leaky_slope=args.leaky_slope, image_size=args.image_size)
  print(report.summary())
  print(f"imported into {args.workdir}: name it as pretrained.workdir in a config")


COMMANDS: dict[str, Callable[[argparse.Namespace, list[str]], None]] = {
    "pretrain": _train_job,
    "finetune": _train_job,
    "solve": _train_job,
    "demo": _demo,
    "bench": _bench,
    "import-weights": _import_weights,
}


OVERWRITE_HELP = ("replace a run of another config or command in --workdir (refused "
                  "without this flag)")


CONFIG_HELP = "a shipped config by name (digits_pretrain, ...) or a config file; NAME:arg " \
              "calls get_config(arg)"


def add_job_parser(sub: Any, name: str, help_text: str, example: str,
                   workdir_help: str = "checkpoints, metrics, results") -> argparse.ArgumentParser:
  """A subcommand that runs a job from a config into a workdir: --config, --workdir,
  --no_progress, --overwrite (and `--config.KEY=VALUE` overrides, e.g. `example`)."""
  j = sub.add_parser(name, help=help_text,
                     description=f"Config overrides: {example} and so on.")
  j.add_argument("--config", required=True, help=CONFIG_HELP)
  j.add_argument("--workdir", required=True, help=workdir_help)
  j.add_argument("--no_progress", action="store_true", help="no progress bar")
  j.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
  return j


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m lqf", description=__doc__)
  sub = p.add_subparsers(dest="command", required=True)
  add_job_parser(sub, "pretrain", "train a network on the source task",
                 "--config.train.lr=0.05")
  add_job_parser(sub, "finetune", "adapt a pretrained network to a target task",
                 "--config.method=nonlinear")
  add_job_parser(sub, "solve", "the exact optimum of a config's LQF problem",
                 "--config.solve.method=kernel", "where the solution is written")
  dm = sub.add_parser("demo", help="the main job on the built-in digits")
  dm.add_argument("--workdir", default="runs/demo")
  dm.add_argument("--no_progress", action="store_true", help="no progress bars")
  dm.add_argument("--quick", action="store_true",
                  help="a smoke run in a minute: tiny images, network and step counts")
  im = sub.add_parser("import-weights", help="an ImageNet ResNet from torchvision or timm",
                      description="Reads .safetensors, .npz or (with torch) .pth weights of "
                      "a torchvision/timm ResNet-18/34/50 and writes them as a finished "
                      "pretraining run.")
  im.add_argument("--weights", required=True, help="the weights file")
  im.add_argument("--workdir", required=True, help="where the run is written")
  im.add_argument("--activation", default="leaky_relu", choices=["leaky_relu", "relu"],
                  help="LQF linearizes a leaky-ReLU network (default)")
  im.add_argument("--leaky_slope", type=float, default=0.1)
  im.add_argument("--image_size", type=int, default=224, help="recorded for reference")
  b = sub.add_parser("bench", help="run a benchmark and write its JSON")
  b.add_argument("name", choices=bench.NAMES)
  b.add_argument("--json", required=True, help="where to write the results")
  b.add_argument("--seeds", type=int, default=5)
  b.add_argument("--quick", action="store_true", help="a fast smoke version")
  b.add_argument("--shots", default="", help="transfer, accuracy, solve: comma-separated "
                 "shots a class, 0 = the whole target set (default 5 for transfer, 5,10,0)")
  b.add_argument("--config", default=bench.common.TRANSFER_CONFIG,
                 help="the transfer task's config, by name or path (default %(default)s; "
                 "fashion_transfer: Fashion-MNIST); not for throughput")
  return p


Command = Callable[[argparse.Namespace, list[str]], None]


def add_bench_parser(sub: Any, help_text: str) -> argparse.ArgumentParser:
  """The `bench` subcommand of a method's CLI: --json, --seeds, --quick."""
  b = sub.add_parser("bench", help=help_text)
  b.add_argument("--json", required=True, help="where to write the results")
  b.add_argument("--seeds", type=int, default=5)
  b.add_argument("--quick", action="store_true", help="a fast smoke version")
  return b


def bench_command(module: ModuleType) -> Command:
  """A `bench` command that runs `module.run(json_path, seeds, quick)` and prints
  `module.format_table` of its document."""

  def command(args: argparse.Namespace, overrides: list[str]) -> None:
    if overrides:
      raise UserError(f"bench takes no config overrides, got {' '.join(overrides)}")
    doc = module.run(json_path=args.json, seeds=args.seeds, quick=args.quick)
    print(module.format_table(doc))

  return command


def dispatch(p: argparse.ArgumentParser,
             commands: dict[str, Callable[[argparse.Namespace, list[str]], None]],
             argv: Sequence[str] | None) -> int:
  """Parses `argv` (the `--config.KEY=VALUE` overrides pass through) and runs the command;
  a `UserError` becomes one `error:` line on stderr and exit status 2."""
  argv = list(sys.argv[1:] if argv is None else argv)
  args, rest = p.parse_known_args(argv)
  unknown = [r for r in rest if not r.startswith("--config.")]
  if unknown:
    p.error(f"unrecognized arguments: {' '.join(unknown)}")
  try:
    commands[args.command](args, rest)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return dispatch(parser(), COMMANDS, argv)
