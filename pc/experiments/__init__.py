"""The experiments that use `pc`: `train` (`python -m pc train`: an old model, a new one,
their flips), `curve` (the exact LQF+PC curve), `bench` and the command line."""

import pc.experiments.bench as bench
import pc.experiments.cli as cli
import pc.experiments.curve as curve
import pc.experiments.train as train

__all__ = ["bench", "cli", "curve", "train"]
