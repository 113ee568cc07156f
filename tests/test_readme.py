"""README.md cannot drift from the code: every command in its code blocks is parsed by the
real command line, its config loads by the name it gives with every override it gives,
and the job's own validation accepts the result. Then every block of commands runs,
in order, on tiny settings appended as flags and overrides (`TINY`); the benchmark
commands' JSON is checked here too, which makes these the benchmarks' smoke tests."""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

from cli_helpers import run_cli
import numpy as np
import pytest

from bct.experiments import cli as bct_cli
from bct.experiments import curve as bct_curve
from bct.experiments import train as bct_train
from lqf.experiments import cli as lqf_cli
from lqf.experiments import finetune as job_finetune
from lqf.experiments import pretrain
from lqf.runtime import config as config_lib
from pc.experiments import cli as pc_cli
from pc.experiments import curve as pc_curve
from pc.experiments import train as pc_train

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CLIS = {"lqf": lqf_cli, "pc": pc_cli, "bct": bct_cli}
SCRIPTS = {"graceful-lqf": "lqf", "graceful-pc": "pc", "graceful-bct": "bct"}
# What validates a loaded config, per (package, command).
CHECKS = {("lqf", "pretrain"): [pretrain.check_config],
          ("lqf", "finetune"): [job_finetune.check_config],
          ("lqf", "solve"): [job_finetune.check_config, job_finetune.check_solve_config],
          ("pc", "train"): [pc_train.check_config],
          ("pc", "curve"): [pc_curve.check_config],
          ("bct", "train"): [bct_train.check_config],
          ("bct", "curve"): [bct_curve.check_config],
          # A benchmark's config is its transfer task; the bench checks what it reads.
          ("lqf", "bench"): []}
# Commands of other tools, each with the reason it is not run here.
FOREIGN = {"make": "the quick start itself (CI runs `make test`)",
           "pip": "needs TensorFlow and the internet to build a catalogue dataset"}


def commands(text: str = README) -> list[str]:
  """Every command line in `text`'s bash blocks: continuations joined, comments and
  comment-only continuation lines dropped."""
  out = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    line = ""
    for raw in block.splitlines():
      text_part = raw.split("#", 1)[0].rstrip()
      if not text_part.strip():
        continue
      if line and not line.endswith("\\") and raw.startswith(" "):
        continue  # An indented comment under the previous command.
      line = (line[:-1] + " " + text_part.strip()) if line.endswith("\\") else \
          text_part.strip()
      if not line.endswith("\\"):
        out.append(line)
        line = ""
  return out


COMMANDS = commands()


def test_the_readme_has_the_commands_it_documents():
  packages = {c.split()[2] for c in COMMANDS if c.startswith("python -m")}
  assert packages == {"lqf", "pc", "bct"}
  assert any(c.startswith("graceful-") for c in COMMANDS)
  assert len(COMMANDS) >= 20


def _argv(command: str) -> tuple[str, list[str]]:
  """(package, argv) of a `python -m PKG ...` or `graceful-PKG ...` command; optional
  parts written `[--seeds 5]` are kept, as a user would type them."""
  words = shlex.split(command.replace("[", " ").replace("]", " "))
  if words[:2] == ["python", "-m"]:
    return words[2], words[3:]
  return SCRIPTS[words[0]], words[1:]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_readme_command_is_accepted_by_the_code(command):
  first = command.split()[0]
  if first in FOREIGN:
    return
  package, argv = _argv(command)
  cli = CLIS[package]
  args, rest = cli.parser().parse_known_args(argv)  # SystemExit on a stale flag.
  assert all(r.startswith("--config.") for r in rest), rest
  if getattr(args, "config", None):
    overrides = [r[len("--config."):] for r in rest]
    cfg = config_lib.load(args.config, overrides)
    for check in CHECKS[(package, args.command)]:
      check(cfg)
  else:
    assert not rest, f"{command}: overrides without a config"
  assert args.command in cli.COMMANDS


# --- Every command runs. ------------------------------------------------------------------
# Each bash block runs in a directory of its own, its commands in order (a block's later
# commands read what its earlier ones wrote), each with the tiny settings below appended:
# the command a user types, shrunk through its own flags and overrides. Optional parts
# written `[...]` are left out. `{pretrained}` is a finished tiny pretraining run.

_TINY_PRETRAIN = ["--config.model.width=4", "--config.model.depth=8",
                  "--config.data.image_size=8", "--config.train.steps=2",
                  "--config.train.batch_size=32",
                  "--config.train.checkpoint_every=2", "--config.train.eval_every=2",
                  "--config.train.log_every=2", "--no_progress"]
_TINY_FINETUNE = ["--config.pretrained.workdir=runs/pretrain", "--config.data.image_size=8",
                  "--config.shots=2", "--config.lqf.scope=last_stage", "--config.lqf.steps=4",
                  "--config.lqf.checkpoint_every=2",
                  "--config.finetune.steps=4", "--config.finetune.checkpoint_every=2",
                  "--config.probe.steps=20", "--no_progress"]
_TINY_PC = ["--config.pretrained.workdir={pretrained}",
            "--config.old.pretrained.workdir={pretrained}", "--config.data.image_size=8",
            "--config.shots=2", "--config.old.shots=2", "--config.old.finetune.steps=3",
            "--config.train.steps=4", "--config.train.checkpoint_every=2",
            "--config.train.eval_every=4", "--config.pc.ensemble_size=2",
            "--config.curve.rhos=(0.0,0.5,1.0)", "--config.curve.references=('none',)",
            "--no_progress"]
_TINY_BCT = [f"--config.{s}.pretrained.workdir={{pretrained}}" for s in ("old", "new")] + [
    "--config.data.image_size=8", "--config.new.shots=3", "--config.old.shots=3",
    "--config.old.finetune.steps=3", "--config.train.steps=4",
    "--config.train.checkpoint_every=2", "--config.train.eval_every=4",
    "--config.curve.rhos=(0.0,0.5,1.0)", "--config.term.batch_size=16"]
TINY = {("lqf", "pretrain"): _TINY_PRETRAIN, ("lqf", "finetune"): _TINY_FINETUNE,
        ("lqf", "solve"): _TINY_FINETUNE, ("lqf", "demo"): ["--quick", "--no_progress"],
        ("lqf", "bench"): ["--quick", "--seeds", "1"], ("lqf", "import-weights"): [],
        ("pc", "train"): _TINY_PC, ("pc", "curve"): _TINY_PC,
        ("pc", "bench"): ["--quick", "--seeds", "1"],
        ("bct", "train"): _TINY_BCT + ["--no_progress"], ("bct", "eval"): [],
        ("bct", "curve"): _TINY_BCT,
        ("bct", "bench"): ["--quick", "--seeds", "1"]}


def _check_transfer(doc, out):
  assert set(doc["arms"]) == {"finetune@5shot", "probe@5shot", "scratch@5shot",
                              "no_adaptation"}
  for arm in doc["arms"].values():
    acc = arm["accuracy"]
    assert len(acc["values"]) == 1 and 0 <= acc["mean"] <= 1
  assert "best_in_60_95" in doc["goals"] and "finetune@5shot" in out


def _check_accuracy(doc, out):
  assert set(doc["arms"]) == {f"{a}@5shot" for a in ("lqf", "lqf_relu", "lqf_ce", "lqf_sgd",
                                                      "finetune", "probe")}
  assert all(0 <= a["accuracy"]["mean"] <= 1 for a in doc["arms"].values())
  assert "lqf_relu@5shot" in out


def _check_solve(doc, out):
  arms = doc["arms"]
  assert set(arms) == {"kernel@5shot", "cg_kfac@5shot", "train_kfac@5shot",
                       "train_sgd@5shot", "train_adam@5shot"}
  assert arms["kernel@5shot"]["objective"]["mean"] > 0
  # CG and training can only be above the optimum, up to float32 round-off.
  assert arms["cg_kfac@5shot"]["gap_to_kernel"]["mean"] > -1e-3
  for name in ("kfac", "sgd", "adam"):
    gaps = doc["curves"][f"train_{name}@5shot"][0]
    assert gaps and all(g > -1e-3 for g in gaps)
  assert "kernel@5shot" in out


def _check_throughput(doc, out):
  d, a = doc["design"], doc["arms"]
  assert doc["meta"]["device"].startswith("cpu")
  assert d["devices"] == 8 and d["global_batch"] % 8 == 0  # conftest's 8 fake devices.
  ratios = [l / n for l, n in zip(a["linearized"]["images_per_second"]["values"],
                                  a["nonlinear"]["images_per_second"]["values"])]
  assert a["ratio"]["linearized / nonlinear images per second"]["values"] == \
      pytest.approx(ratios)
  assert all(v > 0 for v in a["nonlinear"]["images_per_second"]["values"])


def _check_pc(doc, out):
  arms = doc["arms"]
  assert {"none", "naive", "fd_kl", "fd_lm", "ensemble", "lqf", "lqf_pc@rho=0.5"} <= set(arms)
  for arm in arms.values():
    assert len(arm["NFR"]["values"]) == 1
    for er_new, er_old, nfr, pfr in zip(*(arm[k]["values"] for k in
                                          ("ER_new", "ER_old", "NFR", "PFR"))):
      assert er_new - er_old == pytest.approx(nfr - pfr, abs=1e-12)
  assert arms["lqf"] == arms["lqf_pc@rho=0"]
  assert doc["tuning"]["fd_kl"]["lam"] == 1.0  # quick mode's one-point grid
  assert set(doc["goals"]) >= {"untreated_nfr_at_least_2pct", "fd_kl_lowers_nfr",
                               "lqf_pc_beats_best_fd_at_its_er"}
  assert "ensemble" in out


def _check_bct(doc, out):
  arms = doc["arms"]
  assert {"old", "independent", "l2", "bct", "lqf", "lqf_bct", "hetero", "chain"} <= set(arms)
  for arm in ("independent", "bct", "lqf_bct"):
    assert len(arms[arm]["new/old top1"]["values"]) == 1
  assert {f"v{q}/v{g} top1" for q in (1, 2, 3) for g in (1, 2, 3)} <= set(arms["chain"])
  assert "small/large top1" in arms["hetero"]
  assert set(doc["goals"]) == {"independent fails the criterion", "bct passes the criterion",
                               "lqf_bct passes the criterion", "lqf_bct update gain >= 0.3"}
  assert "lqf_bct" in out


# What a benchmark command's JSON must hold (the benchmarks' smoke tests: each bench runs
# once in the suite, here, as README gives it).
BENCH_CHECKS = {("lqf", "transfer"): _check_transfer, ("lqf", "accuracy"): _check_accuracy,
                ("lqf", "solve"): _check_solve, ("lqf", "throughput"): _check_throughput,
                ("pc", None): _check_pc, ("bct", None): _check_bct}


def blocks() -> list[list[str]]:
  """The README's bash blocks as lists of commands, without the other tools' ones."""
  out = []
  for block in re.findall(r"```bash\n(.*?)```", README, re.S):
    cmds = [c for c in _commands_of(block) if c.split()[0] not in FOREIGN]
    if cmds and not set(cmds) <= {c for b in out for c in b}:  # Repeats run once.
      out.append(cmds)
  return out


def _commands_of(block: str) -> list[str]:
  return commands(f"```bash\n{block}```")


def _run(command: str, cwd: pathlib.Path, pretrained: str):
  """Runs `command` (optional parts dropped, TINY settings appended) from `cwd`."""
  words = shlex.split(re.sub(r"\[[^\]]*\]", " ", command))
  script = words[0] in SCRIPTS
  package, argv = (SCRIPTS[words[0]], words[1:]) if script else (words[2], words[3:])
  argv += [a.format(pretrained=pretrained) for a in TINY[(package, argv[0])]]
  if script:  # The console script itself, as installed.
    exe = pathlib.Path(sys.executable).parent / words[0]
    assert exe.exists(), f"{exe} is missing: install the package (make install)"
    return package, argv, subprocess.run([str(exe), *argv], cwd=cwd, capture_output=True,
                                         text=True, timeout=600)
  old = os.getcwd()
  os.chdir(cwd)
  try:
    return package, argv, run_cli(*argv, module=package)
  finally:
    os.chdir(old)


@pytest.mark.parametrize("block", blocks(), ids=lambda b: " / ".join(
    " ".join(c.split()[:4 if c.startswith("python") else 2]) for c in b)[:80])
def test_every_readme_command_runs(block, tmp_path, pretrained):
  if any("import-weights" in c for c in block):
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    from test_weights import stand_in  # pylint: disable=g-import-not-at-top
    save_file(stand_in(50, 4), str(tmp_path / "resnet50.safetensors"))
  for command in block:
    package, argv, proc = _run(command, tmp_path, pretrained)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    if argv[0] == "bench":
      name = argv[1] if package == "lqf" else None
      path = tmp_path / argv[argv.index("--json") + 1]
      doc = json.loads(path.read_text())
      assert set(doc["meta"]) >= {"command", "seeds", "device", "date", "versions"}
      assert doc["meta"]["seeds"] == [0]
      assert doc["meta"]["command"].startswith(f"python -m {package} bench")
      for arm in doc["arms"].values():
        for metric in arm.values():
          if isinstance(metric, dict) and "values" in metric and "mean" in metric and \
              None not in metric["values"] and metric["mean"] is not None:
            assert np.isclose(metric["mean"], np.mean(metric["values"]), equal_nan=True)
      BENCH_CHECKS[(package, name)](doc, proc.stdout)
