"""README.md cannot drift from the code: every command in its code blocks is parsed by the
real command line, its config loads by the name it gives with every override it gives,
and the job's own validation accepts the result. The jobs themselves run end to end in
their own tests (test_job_*, test_pc_job, test_bct_job, test_crash, test_install)."""

import pathlib
import re
import shlex

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


def commands() -> list[str]:
  """Every command line in README.md's bash blocks: continuations joined, comments and
  comment-only continuation lines dropped."""
  out = []
  for block in re.findall(r"```bash\n(.*?)```", README, re.S):
    line = ""
    for raw in block.splitlines():
      text = raw.split("#", 1)[0].rstrip()
      if not text.strip():
        continue
      if line and not line.endswith("\\") and raw.startswith(" "):
        continue  # An indented comment under the previous command.
      line = (line[:-1] + " " + text.strip()) if line.endswith("\\") else text.strip()
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
