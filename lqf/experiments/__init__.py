"""The experiments that use `lqf`: the jobs (`pretrain`, `finetune`, `solve`,
`import_weights`), what the update jobs share (`update`), the benchmarks (`bench`), their configs (`configs`, found by name)
and the command line (`python -m lqf`, `graceful-lqf`)."""

import lqf.experiments.bench as bench
from lqf.experiments.bench.common import ensure_pretrained, pretrained_run
import lqf.experiments.cli as cli
import lqf.experiments.finetune as finetune
import lqf.experiments.import_weights as import_weights
import lqf.experiments.pretrain as pretrain
import lqf.experiments.solve as solve
import lqf.experiments.update as update

__all__ = ["bench", "cli", "ensure_pretrained", "finetune", "import_weights", "pretrain",
           "pretrained_run", "solve", "update"]
