"""graceful's core: linear quadratic fine-tuning (LQF).

A pretrained network f(x; w0) is linearized around its weights,
f_lin(x; δ) = f(x; w0) + J(x) δ (one `jax.jvp`), and fine-tuned with the squared loss
1/N Σ ||f_lin(x_i; δ) − k·y_i||² + λ||δ||², a convex quadratic in δ. This package holds
the maths (linearization, objective, exact and iterative solvers, convexity tools), the
models, the data and the training runtime; `lqf.experiments` holds the jobs, benchmarks
and the command line, and nothing here imports it.

    import lqf
    clf = lqf.build_classifier(model_cfg, num_classes=10, in_channels=1, seed=0)
    lin = lqf.linearize.linearize(clf.split_at, clf.params, clf.batch_stats, "all",
                                  select=clf.linearizable)
    problem = lqf.solve.mse_problem(lin.apply, lin.state, lin.zeros(), feats, labels, 10,
                                    k=5.0, lam=1e-4)
    delta = lqf.solve.kernel_solve(problem).delta
"""

import lqf.convexity as convexity
import lqf.data as data
from lqf.errors import NonFiniteLossError, UserError
import lqf.finetune as finetune
import lqf.linearize as linearize
from lqf.linearize import Linearized
import lqf.models as models
from lqf.models import Classifier, build_classifier
import lqf.objective as objective
import lqf.optim as optim
import lqf.runtime as runtime
import lqf.solve as solve
from lqf.solve import Problem, Solution, Term

__all__ = [
    "Classifier", "Linearized", "NonFiniteLossError", "Problem", "Solution", "Term",
    "UserError", "build_classifier", "convexity", "data", "finetune", "linearize", "models",
    "objective", "optim", "runtime", "solve",
]
