"""The experiments that use `bct`: `train` and its retrieval table (`python -m bct train`,
`eval`), `curve` (the exact LQF+compatibility curve), `bench` and the command line."""

import bct.experiments.bench as bench
import bct.experiments.cli as cli
import bct.experiments.curve as curve
import bct.experiments.train as train

__all__ = ["bench", "cli", "curve", "train"]
