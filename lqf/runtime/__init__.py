"""What runs a training job: the optax training loop, orbax checkpoints and the workdir
guard, the device mesh, atomic file writes and metrics, config files and overrides,
fault injection for the crash tests."""

import lqf.runtime.checkpoint as checkpoint
import lqf.runtime.config as config
import lqf.runtime.faults as faults
import lqf.runtime.io as io
import lqf.runtime.parallel as parallel
import lqf.runtime.train as train

__all__ = ["checkpoint", "config", "faults", "io", "parallel", "train"]
