"""Fine-tune the pretrained digits model on the shifted-digits target task.

    python -m lqf pretrain --config digits_pretrain --workdir runs/digits_pretrain
    python -m lqf finetune --config digits_finetune --workdir runs/ft_lqf
    python -m lqf finetune --config digits_finetune --workdir runs/ft_nonlinear \
        --config.method=nonlinear

`method` is "lqf" (linearized, squared loss, K-FAC), "nonlinear" (every weight, cross-
entropy) or "probe" (the head on frozen features). The LQF ablations are config changes:
`--config.lqf.loss=ce`, `--config.lqf.optimizer=sgd --config.lqf.adaptive=False
--config.lqf.lr=3e-4`, and a ReLU backbone via `--config.pretrained.workdir`.
`--config.lqf.report_gap=True` also prints the trained δ's relative gap to the exact
optimum, and

    python -m lqf solve --config digits_finetune --workdir runs/solve

computes that optimum itself (`solve.method=cg` or `kernel`).

Expected at 5 shots a class (docs/BENCHMARKS.md, the mean over 5 subsets): about 90% for
LQF, 91.5% for the probe, 85.5% for nonlinear fine-tuning; one subset (seed 0) is run here.
"""

import ml_collections

import lqf.experiments.configs.digits_transfer as digits_transfer
import lqf.runtime.config as config_lib


def get_config() -> ml_collections.ConfigDict:
  t = digits_transfer.get_config()
  c = ml_collections.ConfigDict()
  c.seed = 0                       # The few-shot subset, the new head, the batch order.
  c.method = "lqf"
  c.pretrained = t.pretrained
  c.data = t.data
  c.shots = 5
  c.lqf = t.lqf
  c.solve = t.solve
  c.finetune = t.finetune
  c.finetune.lr = 0.003            # The benchmark's choice on the validation split.
  c.finetune.checkpoint_every = 50
  c.finetune.log_every = 10
  c.probe = t.probe
  c.probe.lr = 0.001
  c.parallel = config_lib.parallel_config()
  return c
