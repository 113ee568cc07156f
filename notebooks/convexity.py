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
# # The shape of the LQF problem
#
# LQF replaces fine-tuning of a pretrained ResNet by training its linearization
# `f_lin(x; δ) = f(x; w0) + J(x) δ` with a squared loss and a ridge on δ. The objective is
# then a convex quadratic in δ. This notebook looks at that on the built-in digits task:
#
# 1. the nonlinear and the linearized objectives along 1-D and 2-D slices through δ,
# 2. their Hessian spectra (Lanczos), and how much each Hessian changes with δ,
# 3. K-FAC, SGD and Adam training curves against the exact optimum.
#
# Open it in Jupyter with jupytext (`pip install jupytext`, then open this `.py` file as a
# notebook). `make test` runs it from top to bottom. Set `QUICK = False` for the full
# version (a few minutes on a laptop CPU).

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from lqf import convexity, finetune, linearize, objective, optim, solve
from lqf.data import pipeline
from lqf.experiments import pretrain, pretrained_run
from lqf.runtime import config as config_lib

QUICK = os.environ.get("GRACEFUL_NOTEBOOK_QUICK", "1") == "1"
if QUICK:
  matplotlib.use("Agg")
if os.path.basename(os.getcwd()) == "notebooks":  # Work from the repository root.
  os.chdir("..")

# %% [markdown]
# ## The problem
# The digits source model (pretrained here in a few seconds when no run exists; the
# transfer benchmark's model at `runs/digits_pretrain` when it does), a new head for the
# shifted, noisy target digits, and 5 labelled images a class.

# %%
# Quick mode (the tests): 8×8 images and a width-8 model, so that it runs in seconds.
cfg = config_lib.load("digits_transfer", ["data.image_size=8"] if QUICK else [])
quick = (["train.steps=40", "train.checkpoint_every=40", "model.width=8", "model.depth=8",
         "data.image_size=8"]
         if QUICK else [])
workdir = pretrained_run(cfg.pretrained, suffix="_convexity_quick" if QUICK else "",
                         overrides=quick, progress=False)
pre_record, source = pretrain.load_pretrained(workdir)

data = pipeline.load_split(cfg.data, cfg.data.train_split, corrupted=True, shots=5,
                           subset_seed=0)
clf = finetune.with_new_head(source, pre_record["model"], data.num_classes,
                             cfg.data.channels, seed=0)
c = config_lib.to_dict(cfg.lqf)
lin = linearize.linearize(clf.split_at, clf.params, clf.batch_stats, "all", select=clf.linearizable)
feats, labels = jnp.asarray(data.images), jnp.asarray(data.labels)
lq = objective.make_loss(lin.apply, loss="mse", k=c["k"], lam=c["lam"])
nl = objective.make_nonlinear_loss(lin.nonlinear, loss="mse", k=c["k"], lam=c["lam"])
L_lin = jax.jit(lambda d: lq(d, lin.state, (feats, labels)))
L_nonlin = jax.jit(lambda d: nl(d, lin.state, (feats, labels)))
num_params = sum(x.size for x in jax.tree.leaves(lin.zeros()))
print(f"{len(labels)} images, {num_params} linearized weights")

# %% [markdown]
# ## 1. Slices
# Directions are random, with each layer scaled to the norm of that layer's pretrained
# weights, so a step of 1 changes every layer by its own size. Along a line the
# linearized objective is a parabola; the nonlinear one is not.

# %%
d1 = convexity.random_direction(lin.zeros(), 1, reference=lin.state["w0"])
d2 = convexity.random_direction(lin.zeros(), 2, reference=lin.state["w0"])
alphas = np.linspace(-1.0, 1.0, 7 if QUICK else 41)
line_lin = convexity.slice_1d(L_lin, lin.zeros(), d1, alphas)
line_nonlin = convexity.slice_1d(L_nonlin, lin.zeros(), d1, alphas)
curv_lin = convexity.curvature_along(line_lin, alphas)
curv_nonlin = convexity.curvature_along(line_nonlin, alphas)
print(f"second differences along d1, linearized: {curv_lin.min():.4g} .. {curv_lin.max():.4g}")
print(f"second differences along d1, nonlinear:  {curv_nonlin.min():.4g} .. {curv_nonlin.max():.4g}")
assert np.allclose(curv_lin, curv_lin.mean(), rtol=1e-2)  # A parabola, up to float32.

grid = np.linspace(-1.0, 1.0, 5 if QUICK else 25)
surf_lin = convexity.slice_2d(L_lin, lin.zeros(), d1, d2, grid, grid)
surf_nonlin = convexity.slice_2d(L_nonlin, lin.zeros(), d1, d2, grid, grid)

fig, ax = plt.subplots(1, 3, figsize=(14, 4))
ax[0].plot(alphas, line_lin, label="linearized")
ax[0].plot(alphas, line_nonlin, label="nonlinear")
ax[0].set(xlabel="α (δ = α·d1)", ylabel="objective", yscale="log", title="1-D slice")
ax[0].legend()
for a, surf, name in ((ax[1], surf_lin, "linearized"), (ax[2], surf_nonlin, "nonlinear")):
  cs = a.contour(grid, grid, np.log10(surf.T), levels=15)
  a.clabel(cs, fontsize=7)
  a.set(xlabel="α (d1)", ylabel="β (d2)", title=f"log10 objective, {name}")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Hessian spectra
# Extreme eigenvalues by Lanczos from Hessian-vector products, at δ = 0 and at a point
# one step away along d1. The linearized Hessian is the same at both points and has no
# negative eigenvalue (2·(JᵀJ/N + λI) ⪰ 2λI); the nonlinear one changes and need not be
# positive semi-definite.

# %%
iters = 8 if QUICK else 60
far = jax.tree.map(lambda d: 1.0 * d, d1)
spectra = {}
for name, loss in (("linearized", L_lin), ("nonlinear", L_nonlin)):
  for where, at in (("δ=0", lin.zeros()), ("δ=d1", far)):
    spectra[name, where] = convexity.lanczos(lambda v, loss=loss, at=at: convexity.hvp(
        loss, at, v), lin.zeros(), num_iters=iters)
    s = spectra[name, where]
    print(f"{name:>10} at {where}: λ_min ≈ {s.smallest:.4g}, λ_max ≈ {s.largest:.4g}")
v = convexity.random_direction(lin.zeros(), 3)
change_lin = convexity.hessian_change(L_lin, lin.zeros(), far, v)
change_nonlin = convexity.hessian_change(L_nonlin, lin.zeros(), far, v)
print(f"relative change of H·v from δ=0 to δ=d1: linearized {change_lin:.2g}, "
      f"nonlinear {change_nonlin:.2g}")
assert change_lin < 1e-3 and spectra["linearized", "δ=d1"].smallest > -1e-3

fig, ax = plt.subplots(figsize=(6, 3))
for i, (key, s) in enumerate(spectra.items()):
  ax.scatter(s.ritz_values, np.full(len(s.ritz_values), i), s=12)
ax.set_yticks(range(len(spectra)), [f"{n}, {w}" for n, w in spectra])
ax.set_xscale("symlog", linthresh=1e-3)
ax.set(xlabel="Ritz values (Lanczos)", title="Hessian spectra")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. Training against the exact optimum
# The optimum comes from the tangent-kernel solve `δ* = Jᵀ(K + NλI)⁻¹ r`. K-FAC (step
# and momentum from its exact quadratic model), SGD with momentum and Adam train the same
# objective; the curves show the relative gap `(L - L*)/L*`.

# %%
problem = solve.mse_problem(lin.apply, lin.state, lin.zeros(), feats, labels,
                            data.num_classes, k=c["k"], lam=c["lam"])
exact = solve.kernel_solve(problem)
print(f"exact optimum L* = {exact.objective:.6g} (L(0) = {float(L_lin(lin.zeros())):.4g})")

steps = 10 if QUICK else 200
curves = {}
for name, o in (("K-FAC", dict(c)),
                ("SGD (lr 3e-4)", dict(c, optimizer="sgd", adaptive=False, lr=3e-4)),
                ("Adam (lr 1e-3)", dict(c, optimizer="adam", adaptive=False, lr=1e-3))):
  gaps = []
  optim.fit(lq, lin.zeros(), lin.state, feats, labels, dict(o, steps=steps),
            seed=0, callback=lambda s, d, _: gaps.append(
                solve.relative_gap(float(L_lin(d)), exact.objective)))
  curves[name] = gaps
  print(f"{name:>15}: gap after {steps} steps {gaps[-1]:.3g}")

fig, ax = plt.subplots(figsize=(6, 4))
for name, gaps in curves.items():
  ax.plot(np.arange(1, len(gaps) + 1), gaps, label=name)
ax.axhline(0.01, color="gray", ls="--", label="1% gap")
ax.set(xlabel="step", ylabel="(L - L*) / L*", yscale="log", title="Distance to the optimum")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# **Reading the plots.** The linearized objective is a bowl: constant curvature along
# every line, no negative Hessian eigenvalue, the same Hessian everywhere. The nonlinear
# objective agrees with it at δ = 0 (same value and gradient) but bends differently away
# from it. Because the problem is convex and quadratic, its optimum is computable exactly,
# and every training run can be judged by its gap to it instead of by a loss curve that
# only flattens. `python -m lqf bench solve` measures these curves over seeds
# (docs/BENCHMARKS.md).
