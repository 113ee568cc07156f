# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Backward-compatible embeddings across model updates
#
# An old embedding model has indexed a gallery. A new model should embed queries that are
# compared directly with the old gallery, so that nothing has to be re-indexed. This
# notebook, on the built-in digits:
#
# 1. trains an old model on half the classes and new models on all of them, independently
#    and with BCT's influence loss, and shows the matrix of cross-model retrieval;
# 2. computes the linearized new model's exact compatibility curve (new/new against
#    new/old retrieval) as the influence term's share ρ sweeps from 0 to 1;
# 3. shows the neighbours a query retrieves in the old gallery, with each new model.
#
# `make test` runs it with tiny settings; set `QUICK = False` (or the environment variable
# `GRACEFUL_NOTEBOOK_QUICK=0`) for the real ones (several minutes on a laptop CPU).

# %%
import os

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from bct import embedding, retrieval
from bct.experiments import curve as job_curve
from bct.experiments import train as job
from lqf.experiments import pretrained_run
from lqf.runtime import config as config_lib

QUICK = os.environ.get("GRACEFUL_NOTEBOOK_QUICK", "1") == "1"
if QUICK:
  matplotlib.use("Agg")
if os.path.basename(os.getcwd()) == "notebooks":  # Work from the repository root.
  os.chdir("..")

# %% [markdown]
# ## Two backbones and an update
# The new model's ResNet-20 of width 16 and the old model's of width 8 (made here in
# seconds when missing; the benchmark's when they exist). The old model is fine-tuned on
# the digits 0-4 only, the new ones on every digit; their embeddings have 64 and 32
# dimensions, and a new query meets the old gallery through its first 32 coordinates.

# %%
def backbone(spec):
  quick = (["train.steps=15", "train.checkpoint_every=15", "model.width=4", "model.depth=8",
            "data.image_size=8"] if QUICK else [])
  return pretrained_run(spec, suffix="_notebook_quick" if QUICK else "", overrides=quick,
                        progress=False)

base = config_lib.load("digits_bct")
new_dir, old_dir = backbone(base.new.pretrained), backbone(base.old.pretrained)
overrides = [f"new.pretrained.workdir={new_dir}", f"old.pretrained.workdir={old_dir}"]
if QUICK:
  overrides += ["train.steps=15", "old.finetune.steps=15", "new.shots=5",
                "curve.rhos=(0.0,0.5,1.0)", "data.image_size=8"]
cfg = config_lib.load("digits_bct", overrides)
data, evaluation = job.load_data(cfg)
classes = tuple(range(data.num_classes))
old = job.old_model(cfg, data.num_classes)
head = job.old_head(old, classes, data, cfg.bct.synth_norm, cfg.bct.synth_center)
models = {"old": old}
for method in ("independent", "bct"):
  models[method] = job.fit_model(cfg, cfg.new, data, cfg.train, seed=cfg.seed,
                                 method=method, heads=[head], old=old)

# %% [markdown]
# ## The retrieval matrix
# Every test image is a query and a gallery item (its own match left out). Row: the model
# that embeds the queries; column: the model that embedded the gallery. The compatibility
# criterion asks new/old > old/old: a new model whose queries find more in the old
# gallery than the old model's own queries did.

# %%
names = list(models)
table = job.cross_retrieval(cfg, models, evaluation, [(q, g) for q in names for g in names])
matrix = np.array([[table[f"{q}/{g}"]["top1"] for g in names] for q in names])
fig, ax = plt.subplots(figsize=(4, 3.4))
im = ax.imshow(100 * matrix, cmap="viridis", vmin=0, vmax=100)
ax.set_xticks(range(len(names)), names)
ax.set_yticks(range(len(names)), names)
ax.set_xlabel("gallery model")
ax.set_ylabel("query model")
for i in range(len(names)):
  for j in range(len(names)):
    ax.text(j, i, f"{100 * matrix[i, j]:.1f}", ha="center", va="center", color="w", fontsize=8)
fig.colorbar(im, label="top-1 (%)")
fig.tight_layout()
for m in ("independent", "bct"):
  verdict = retrieval.compatible(table[f"{m}/old"]["top1"], table["old/old"]["top1"])
  print(f"{m}: new/old {100 * table[f'{m}/old']['top1']:.2f}% against old/old "
        f"{100 * table['old/old']['top1']:.2f}%: {'passes' if verdict else 'fails'}")

# %% [markdown]
# ## The exact compatibility curve of the linearized model
# Linearized around its pretrained weights, the new model's embedding is affine in the
# weight change δ; the old head applied to it is too. So the influence loss with a squared
# error is one more quadratic term of the LQF objective, and one Jacobian gives the exact
# optimum at every share ρ of that term: ρ = 0 is plain LQF, ρ = 1 keeps only the old
# head's wish. Each point below is an exact solution, nothing retrained.

# %%
curve = job_curve.lqf_curve(cfg, data, evaluation, old, cfg.curve.rhos, cfg.seed)
print(job_curve.format_table({"old/old": curve["old/old"], "points": curve["points"]}))
pts = [job_curve.flat_point(p) for p in curve["points"]]
fig, ax = plt.subplots(figsize=(5, 4))
ax.plot([100 * p["new/old top1"] for p in pts], [100 * p["new/new top1"] for p in pts], "o-",
        label="LQF + influence (exact)")
for m in ("independent", "bct"):
  ax.plot(100 * table[f"{m}/old"]["top1"], 100 * table[f"{m}/{m}"]["top1"], "s", label=m)
ax.axvline(100 * table["old/old"]["top1"], color="gray", ls="--", label="old/old")
ax.set_xlabel("new/old top-1 (%)")
ax.set_ylabel("new/new top-1 (%)")
ax.legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# ## Neighbours across models
# A few queries and the three nearest old-gallery images each new model retrieves for
# them. Independent training puts the new embedding in a space unrelated to the old one:
# its neighbours in the old gallery are close to random.

# %%
feats = job.embed_all(models, evaluation.images)
gallery = embedding.normalise(feats["old"])
queries = np.random.default_rng(0).choice(len(evaluation), 4, replace=False)
fig, axes = plt.subplots(len(queries), 1 + 2 * 3, figsize=(8, 1.3 * len(queries)))
for row, qi in zip(axes, queries):
  row[0].imshow(evaluation.images[qi, ..., 0], cmap="gray")
  row[0].set_title(f"query {evaluation.labels[qi]}", fontsize=7)
  for k, m in enumerate(("independent", "bct")):
    q = embedding.normalise(embedding.match_dim(feats[m][qi:qi + 1], gallery.shape[1],
                                                cfg.bct.dim_rule))
    d = retrieval.sq_distances(q, gallery)[0]
    d[qi] = np.inf  # Its own image is not a neighbour.
    for j, gi in enumerate(np.argsort(d, kind="stable")[:3]):
      a = row[1 + 3 * k + j]
      a.imshow(evaluation.images[gi, ..., 0], cmap="gray")
      a.set_title(f"{m[:3]}: {evaluation.labels[gi]}", fontsize=7)
for a in axes.ravel():
  a.axis("off")
fig.tight_layout()
