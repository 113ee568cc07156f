"""A model update on the digits transfer task: an old model that saw 5 labelled examples
a class, a new one that sees 20, and how many of the old model's right answers the new
one breaks.

    python -m lqf pretrain --config digits_pretrain --workdir runs/digits_pretrain
    python -m pc train --config digits_pc --workdir runs/pc_none --config.pc.method=none
    python -m pc train --config digits_pc --workdir runs/pc_fd_kl
    python -m pc curve --config digits_pc --out runs/pc_curve

Both models start from the pretrained digits ResNet with a new head. The old model is
fine-tuned (cross-entropy, every weight) on a 5-shot subset of the target training split,
either here (`old.workdir=""`, the default: trained in memory, the same for every command
with the same seed) or loaded from a finished `python -m lqf finetune
--config.method=nonlinear` or `python -m pc train` run (`old.workdir=DIR`). The new model
sees a 20-shot subset that contains the old one's. `pc.method` chooses its training loss:
"none" (cross-entropy), "naive" (cross-entropy re-weighted by α + β·1(old right)),
"fd_kl" / "fd_lm" (focal distillation), or "ensemble" (`pc.ensemble_size` untreated
models, logits averaged). `pc.old_outputs` computes the old logits "alongside" the new
model in every step or once, "stored" in `workdir/old_logits.npy`.

`python -m pc curve` solves the linearized new model's LQF problem with the PC term
(weights α + β·1(old right), the `term` block) exactly at each penalty share in
`curve.rhos`, and trains the `curve.references` arms for comparison.

Expected (docs/BENCHMARKS.md, `python -m pc bench`): the untreated update flips a few
percent of the test set negatively; focal distillation lowers that.
"""

import ml_collections

import lqf.experiments.configs.digits_transfer as digits_transfer
import lqf.runtime.config as config_lib
import pc.experiments.configs.common as common


def get_config() -> ml_collections.ConfigDict:
  t = digits_transfer.get_config()
  c = ml_collections.ConfigDict()
  c.seed = 0                          # Subsets, heads, batch order (old: seed + 1000).
  c.pretrained = t.pretrained
  c.data = t.data
  c.val_split = t.val_split           # The benchmark picks FD's λ here.
  c.shots = 10                        # Examples per class (0 = all 419).
  # The old model: a smaller ResNet-20 (width 8, pretrained with another seed) fine-tuned
  # on a 5-shot subset of the new one's.
  c.old = dict(workdir="", shots=10, allow_other_dataset=False,
               pretrained=config_lib.pretrained_config("runs/digits_pretrain_small",
                                                       "digits_pretrain:small"))
  c.old.finetune = dict(t.finetune, lr=0.003)
  c.init = "finetune"                 # "finetune" (pretrained backbone) or "scratch".
  # The distillation terms pull the logits toward the old model's (±20 here), whose
  # gradients are unbounded, unlike cross-entropy's: clipping keeps SGD stable (without
  # it FD diverged within 30 steps at every learning rate tried, 3e-4 to 3e-3).
  c.train = dict(t.finetune, lr=0.003, steps=100, checkpoint_every=50, eval_every=50,
                 log_every=10, clip_norm=1.0)
  c.pc = common.pc_block()
  # The linearized new model: LQF's objective plus the PC term (pc/lqf_term.py), solved
  # exactly along the penalty share ρ.
  c.lqf = dict(t.lqf)
  c.term = common.term_block()
  c.curve = common.curve_block()
  # What only the benchmark reads: the grid for FD's λ, chosen on the validation split
  # (the lowest NFR among the values whose error rate is within a point of no treatment's).
  c.bench = dict(lam_grid=(0.01, 0.1, 1.0))
  c.parallel = config_lib.parallel_config()
  return c
