"""Running `python -m lqf` (or `pc`) as a user does, and checking its one-line errors."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, cwd=ROOT, module="lqf"):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ))


def assert_one_line_error(proc, match):
  """Exit code 2, no traceback, exactly one `error:` line, which contains `match`."""
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and match in lines[0], proc.stderr
