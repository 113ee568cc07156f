"""`python -m lqf bench throughput`: images per second of one training step of an
ImageNet ResNet-50 (224×224), nonlinear against linearized, on the machine it runs on.

Both arms are one SGD-with-momentum step over every weight, batch norm on its running
statistics (as fine-tuning and LQF run it): "nonlinear" back-propagates cross-entropy
through the network; "linearized" back-propagates LQF's squared loss through
`jax.jvp` of the network at w0 (`lqf.linearize`, scope "all"). The batch is split over
every device of the machine (`lqf.parallel`). Each seed is one round of interleaved
timings, and the ratio is taken per round, so a slow moment of a shared machine hits
both arms alike. The weights are random: throughput does not depend on their values.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lqf.experiments.bench.common as common
import lqf.linearize as linearize
from lqf.models.classifier import build_classifier
import lqf.objective as objective
import lqf.runtime.parallel as parallel
import lqf.runtime.train as train

# The CPU default is a small batch (a 224×224 ResNet-50 step takes seconds on a CPU);
# an accelerator gets a batch that keeps it busy.
BATCH = {"cpu": 8, "gpu": 128, "tpu": 128}


def run(*, seeds: int = 5, quick: bool = False, batch: int | None = None) -> dict[str, Any]:
  platform = jax.devices()[0].platform
  devices = jax.device_count()
  model = dict(arch="imagenet", depth=18 if quick else 50, width=8 if quick else 64,
               activation="leaky_relu", leaky_slope=0.1)
  size = 64 if quick else 224
  b = batch or (4 if quick else BATCH.get(platform, 8))
  b = max(b // devices, 1) * devices  # A whole number of rows per device.
  mesh = parallel.make_mesh(0) if devices > 1 else None
  clf = build_classifier(model, 1000, 3, 0)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(b, size, size, 3)).astype(np.float32)
  y = rng.integers(0, 1000, size=b).astype(np.int32)
  lin = linearize.linearize(clf.split_at, clf.params, clf.batch_stats, "all",
                            select=clf.linearizable)
  params, stats, state, zeros = clf.params, clf.batch_stats, lin.state, lin.zeros()
  if mesh is not None:
    params, stats, state, zeros = parallel.replicate((params, stats, state, zeros), mesh)
    x, y = parallel.shard_batch((x, y), mesh)
  else:
    x, y = jnp.asarray(x), jnp.asarray(y)
  lqf_loss = objective.make_loss(lin.apply, loss="mse", k=5.0, lam=1e-4)
  fns = {
      "nonlinear": common.sgd_step_timer(
          lambda p, s, xb, yb: train.cross_entropy(clf.apply(p, s, xb), yb),
          params, stats, x, y)[0],
      # Scope "all": the prefix is the identity, so the step reads the images themselves.
      "linearized": common.sgd_step_timer(
          lambda d, s, xb, yb: lqf_loss(d, s, (xb, yb)), zeros, state, x, y)[0],
  }
  repeats = 2 if quick else 3
  rounds = [common.time_steps(fns, repeats) for _ in range(seeds)]  # pylint: disable=protected-access
  ips = {n: [b / float(np.median(r[n])) for r in rounds] for n in fns}
  arms = {n: {"images_per_second": common.summary(v)} for n, v in ips.items()}
  arms["ratio"] = {"linearized / nonlinear images per second": common.summary(
      [lin_v / non_v for lin_v, non_v in zip(ips["linearized"], ips["nonlinear"])])}
  return {"arms": arms,
          "design": {"model": model, "image_size": size, "global_batch": b,
                     "devices": devices, "platform": platform,
                     "repeats_per_round": repeats,
                     "step": "SGD (momentum 0.9) over every weight, BN on running stats"}}
