"""The second backbone family (a small ViT) through the backbone protocol: its pure views,
its linearization under K-FAC, the exact solvers, and the jobs end to end."""


from cli_helpers import tiny_finetune_config
from dense import assert_solvers_match_dense, kfac_initialised
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqf import linearize, optim, solve
from lqf.errors import UserError
from lqf.models import backbone, resnet, vit
from lqf.models.classifier import build_classifier
from lqf.runtime import config as config_lib

MODEL = dict(arch="vit", patch=4, dim=8, depth=2, heads=2, mlp_dim=16,
             activation="leaky_relu", leaky_slope=0.1, image_size=8)
N, C, SIZE = 6, 3, 8


@pytest.fixture(scope="module")
def net():
  return build_classifier(MODEL, C, 1, seed=0)


@pytest.fixture(scope="module")
def x():
  return jnp.asarray(np.random.default_rng(1).normal(size=(N, SIZE, SIZE, 1)), jnp.float32)


def _paths(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in p)
          for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_registry_maps_archs_to_families():
  assert backbone.for_arch("cifar") is resnet and backbone.for_arch("imagenet") is resnet
  assert backbone.for_arch("vit") is vit
  with pytest.raises(ValueError, match="unknown model arch"):
    backbone.for_arch("mlp")


def test_forward_shapes_and_no_batch_stats(net, x):
  assert net.backbone is vit and net.batch_stats == {}
  assert net.apply(net.params, net.batch_stats, x).shape == (N, C)
  assert net.features(net.params, net.batch_stats, x).shape == (N, MODEL["dim"])
  logits, feats = net.apply_both(net.params, net.batch_stats, x)
  assert logits.shape == (N, C) and feats.shape == (N, MODEL["dim"])
  out, stats = net.train_apply(net.params, net.batch_stats, x)
  assert stats == {}
  np.testing.assert_allclose(out, logits, rtol=1e-6)


@pytest.mark.parametrize("point", ["input", "last_stage", "head"])
def test_split_at_composes_to_the_network(net, x, point):
  full = net.apply(net.params, net.batch_stats, x)
  prefix, suffix = net.split_at(point)
  got = suffix(net.params, net.batch_stats, prefix(net.params, net.batch_stats, x))
  np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)
  prefix, suffix = net.split_at(point, output="joint")
  joint = suffix(net.params, net.batch_stats, prefix(net.params, net.batch_stats, x))
  np.testing.assert_allclose(joint[:, :C], full, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(joint[:, C:], net.features(net.params, {}, x), rtol=1e-5,
                             atol=1e-5)


def test_wrong_image_size_is_a_clear_error(net):
  with pytest.raises(ValueError, match="model.image_size"):
    net.apply(net.params, {}, jnp.zeros((1, 12, 12, 1)))


def test_scopes_select_vit_weights_and_freeze_layer_norm(net):
  sel = net.linearizable
  all_ = _paths(sel(net.params, "all", False))
  assert not any("norm" in p for p in all_)
  assert _paths(sel(net.params, "all", True)) == _paths(net.params)
  assert _paths(sel(net.params, "head", False)) == {"head/kernel", "head/bias"}
  last = _paths(sel(net.params, "last_stage", False))
  assert last and all(p.startswith(("blocks/1/", "head/")) for p in last)
  assert "norm/scale" in _paths(sel(net.params, "last_stage", True))
  # The same through linearize's explicit backbone argument, and the size count.
  assert _paths(linearize.linearized_subtree(net.params, "last_stage", backbone=vit)) == last
  assert solve.linearized_size(net.params, "all", select=sel) == sum(
      np.size(l) for l in jax.tree.leaves(sel(net.params, "all", False)))


@pytest.mark.parametrize("scope", ["all", "last_stage", "head"])
def test_f_lin_at_zero_is_the_network(net, x, scope):
  lin = linearize.linearize(net.split_at, net.params, net.batch_stats, scope,
                            select=net.linearizable)
  assert _paths(lin.state["w0"]) == _paths(net.linearizable(net.params, scope, False))
  h = linearize.prefix_features(lin, x)
  np.testing.assert_allclose(lin.apply(lin.zeros(), lin.state, h),
                             net.apply(net.params, net.batch_stats, x), rtol=1e-5, atol=1e-5)


def test_linearize_reads_select_through_a_partial(net):
  import functools
  lin = linearize.linearize(functools.partial(net.split_at, output="joint"), net.params,
                            net.batch_stats, "last_stage", select=net.linearizable)
  assert _paths(lin.state["w0"]) == _paths(net.linearizable(net.params, "last_stage", False))


# Every linearized parameter that kfac-jax does NOT put in a Kronecker-factored block, by
# scope. Every dense kernel is Kronecker. A bias joins its kernel's block only when the
# layer's input is constant in δ (its tangent is zero, so the jvp's tangent is the plain
# `x @ dW + db` pattern): the patch embedding for "all"; q, k, v of the last block for
# "last_stage" (their input is the frozen prefix through a frozen LayerNorm). Any other
# bias (its tangent is added to `dx @ W + x @ dW`) gets a NaiveDiagonal block, and the
# position embedding (a broadcast shift) a ScaleAndShiftDiagonal one.
_BLOCK_BIASES = [f"blocks/{i}/{l}/bias" for i in (0, 1)
                 for l in ("attn/q", "attn/k", "attn/v", "attn/out", "fc1", "fc2")]
KRONECKER = ("DenseTwoKroneckerFactored", "RepeatedDenseKroneckerFactored")
NOT_KRONECKER = {
    "all": {"pos", "head/bias", *_BLOCK_BIASES},
    "last_stage": {"blocks/1/attn/out/bias", "blocks/1/fc1/bias", "blocks/1/fc2/bias",
                   "head/bias"},
}


@pytest.mark.parametrize("scope", ["all", "last_stage"])
def test_kfac_gives_every_dense_kernel_a_kronecker_block(net, x, scope):
  lin = linearize.linearize(net.split_at, net.params, net.batch_stats, scope,
                            select=net.linearizable)
  h = linearize.prefix_features(lin, x)
  y = jnp.arange(N) % C
  opt = kfac_initialised(lin, h, y)
  blocks = optim.kfac_blocks(opt)
  # Which block each parameter of δ is in (same tree as δ); kfac-jax 0.0.8 has no public
  # accessor, as for `optim.kfac_blocks`.
  index = opt._estimator.params_block_index  # pylint: disable=protected-access
  kind = {"/".join(str(getattr(k, "key", k)) for k in p): type(blocks[i]).__name__
          for p, i in jax.tree_util.tree_flatten_with_path(index)[0]}
  assert set(kind) == _paths(lin.state["w0"])
  kernels = {n for n in kind if n.endswith("kernel")}
  # Token-wise layers are "repeated dense" (a DenseTwoKroneckerFactored subclass), the
  # head a plain dense one.
  assert kernels and all(kind[n] in KRONECKER for n in kernels), kind
  assert {n for n in kernels if kind[n] == "DenseTwoKroneckerFactored"} == {"head/kernel"}
  others = {n for n, k in kind.items() if k not in KRONECKER}
  assert others == NOT_KRONECKER[scope], sorted(others)
  assert all(kind[n] in ("NaiveDiagonal", "ScaleAndShiftDiagonal") for n in others), kind


@pytest.mark.parametrize("scope", ["all", "last_stage"])
def test_exact_solvers_match_the_dense_optimum(net, x, scope):
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), net.params)
    lin = linearize.linearize(net.split_at, p64, {}, scope, select=net.linearizable)
    h = linearize.prefix_features(lin, jnp.asarray(x, jnp.float64))
    y = jnp.arange(N) % C
    problem = solve.mse_problem(lin.apply, lin.state, lin.zeros(), h, y, C, k=5.0,
                                lam=1e-2)
    assert_solvers_match_dense(problem)


def test_check_model_validates_vit_configs():
  config_lib.check_model(MODEL)
  for bad, msg in ((dict(dim=9), "multiple of model.heads"),
                   (dict(image_size=10), "multiple of model.patch"),
                   (dict(depth=0), "model.depth must be a positive integer"),
                   (dict(activation="tanh"), "unknown model.activation")):
    with pytest.raises(UserError, match=msg):
      config_lib.check_model(dict(MODEL, **bad))
  with pytest.raises(ValueError, match="cosine|head"):
    build_classifier(dict(MODEL, head="nope"), C, 1, 0)


# One block: the job tests need a ViT end to end, not depth (the block tests above use two).
VIT_SMALL = ["model.dim=8", "model.mlp_dim=16", "model.depth=1", "model.image_size=8",
             "data.image_size=8",
             "train.steps=3", "train.batch_size=32", "train.checkpoint_every=3",
             "train.eval_every=3", "train.log_every=3"]


@pytest.fixture(scope="module")
def vit_pretrained(tmp_path_factory):
  from lqf.experiments import pretrain
  workdir = str(tmp_path_factory.mktemp("vit_pre"))
  cfg = config_lib.load("digits_vit_pretrain", VIT_SMALL)
  pretrain.pretrain(cfg, workdir, progress=False)
  return workdir


def _ft_cfg(pretrained, *extra):
  return tiny_finetune_config(pretrained, "all", "lqf.steps=2", "finetune.steps=2",
                              "finetune.eval_every=2", "probe.steps=5", *extra)


def test_with_new_head_keeps_the_vit_backbone(vit_pretrained):
  from lqf import finetune
  from lqf.experiments import pretrain
  pre_cfg, pre = pretrain.pretrained_for(vit_pretrained, 1)
  clf = finetune.with_new_head(pre, pre_cfg["model"], 5, 1, seed=3)
  assert clf.backbone is vit and clf.params["head"]["kernel"].shape == (8, 5)
  for k in ("embed", "pos", "blocks", "norm"):
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), clf.params[k],
                                     pre.params[k]))


@pytest.mark.parametrize("method", ["lqf", "nonlinear"])
def test_finetune_job_runs_on_a_vit(vit_pretrained, tmp_path, method):
  from lqf.experiments import finetune as job_finetune
  result = job_finetune.run(_ft_cfg(vit_pretrained, f"method={method}"),
                            str(tmp_path / method))
  assert result is not None


def test_solve_job_runs_on_a_vit(vit_pretrained, tmp_path):
  from lqf.experiments import solve as job_solve
  result = job_solve.run(_ft_cfg(vit_pretrained, "solve.method=kernel"), str(tmp_path / "k"),
                         progress=False)
  assert np.isfinite(result["objective"])


def test_lqf_job_runs_on_a_vit_last_stage(vit_pretrained, tmp_path):
  from lqf.experiments import finetune as job_finetune
  assert job_finetune.run(_ft_cfg(vit_pretrained, "lqf.scope=last_stage"),
                          str(tmp_path / "ls")) is not None


def test_solve_job_runs_on_a_vit_last_stage(vit_pretrained, tmp_path):
  from lqf.experiments import solve as job_solve
  job_solve.run(_ft_cfg(vit_pretrained, "solve.method=kernel", "lqf.scope=last_stage"),
                str(tmp_path / "k"), progress=False)
