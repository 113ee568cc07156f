"""Numerical properties of lqf.resnet: shapes, parameter counts, BN modes, purity."""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqf.models import resnet
from lqf.models.resnet import ResNet


def _small(arch: str = "cifar", depth: int = 20, *, width: int = 4, num_classes: int = 5,
           seed: int = 0, **kw) -> ResNet:
  return ResNet(arch=arch, depth=depth, num_classes=num_classes, width=width,
                rngs=nnx.Rngs(seed), **kw)


def _normal(shape: tuple[int, ...], seed: int) -> jax.Array:
  # numpy, not jax.random: the latter compiles a kernel per shape (slow on CPU).
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _images(shape: tuple[int, ...] = (2, 16, 16, 3), seed: int = 1) -> jax.Array:
  return _normal(shape, seed)


def _leaves_equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def _stats(model: ResNet) -> dict:
  # Copies, so later in-place BN updates on `model` cannot alias them.
  return jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))


# --- shapes -------------------------------------------------------------------------


# Eager initialisation compiles a random-number kernel per distinct weight shape (about
# a second each on a small CPU), so the tests share one small configuration per family
# and check the remaining shapes by abstract evaluation of the same code.


@pytest.mark.parametrize("arch,depth,hw,feature_dim", [
    ("cifar", 20, 16, 16),
    ("cifar", 32, 16, 16),
    ("cifar", 56, 16, 16),
    ("imagenet", 18, 32, 32),
    ("imagenet", 34, 32, 32),
    ("imagenet", 50, 32, 128),
])
def test_output_shapes(arch, depth, hw, feature_dim):
  model = nnx.eval_shape(lambda: _small(arch, depth, num_classes=7))
  assert model.feature_dim == feature_dim
  apply, params, stats = resnet.split_apply(model)
  feats, _, _ = resnet.split_apply(model, output="features")
  x = jax.ShapeDtypeStruct((2, hw, hw, 3), jnp.float32)
  assert jax.eval_shape(apply, params, stats, x).shape == (2, 7)
  assert jax.eval_shape(feats, params, stats, x).shape == (2, feature_dim)


@pytest.mark.parametrize("arch,depth,hw", [("cifar", 20, 16), ("imagenet", 18, 32)])
def test_real_forward_is_finite(arch, depth, hw):
  model = _small(arch, depth)
  model.eval()
  x = _images((2, hw, hw, 3))
  logits, feats = model(x), model.features(x)
  assert logits.shape == (2, 5) and feats.shape == (2, model.feature_dim)
  assert bool(jnp.all(jnp.isfinite(logits))) and float(jnp.std(feats)) > 0


def test_features_shape_with_grayscale_input():
  model = _small(in_channels=1)
  model.eval()
  x = _images((3, 12, 12, 1))
  assert model.features(x).shape == (3, 16)
  assert model(x).shape == (3, 5)


def test_imagenet_strided_layers_pad_like_torchvision():
  # 'SAME' would pad (2, 3) / (0, 1) at stride 2 on even inputs, torch pads (3, 3) /
  # (1, 1): compare against lax with torch's padding.
  model = _small("imagenet", 18, width=4)
  x = _images((1, 32, 32, 3))
  dn = ("NHWC", "HWIO", "NHWC")
  stem = jax.lax.conv_general_dilated(x, model.conv_init.kernel[...], (2, 2),
                                      ((3, 3), (3, 3)), dimension_numbers=dn)
  np.testing.assert_allclose(model.conv_init(x), stem, rtol=1e-5, atol=1e-5)

  y = _images((1, 8, 8, 4))
  block = model.stages[1][0]
  ref = jax.lax.conv_general_dilated(y, block.conv1.kernel[...], (2, 2), ((1, 1), (1, 1)),
                                     dimension_numbers=dn)
  np.testing.assert_allclose(block.conv1(y), ref, rtol=1e-5, atol=1e-5)
  proj = jax.lax.conv_general_dilated(y, block.shortcut_conv.kernel[...], (2, 2), "VALID",
                                      dimension_numbers=dn)
  np.testing.assert_allclose(block.shortcut_conv(y), proj, rtol=1e-5, atol=1e-5)


# --- parameter counts ---------------------------------------------------------------


@pytest.mark.parametrize("depth,expected", [
    (18, 11_689_512), (34, 21_797_672), (50, 25_557_032)])
def test_imagenet_param_counts_match_torchvision(depth, expected):
  model = nnx.eval_shape(lambda: ResNet(arch="imagenet", depth=depth, num_classes=1000,
                                        width=64, rngs=nnx.Rngs(0)))
  assert resnet.count_params(nnx.state(model, nnx.Param)) == expected
  assert model.feature_dim == (2048 if depth == 50 else 512)


def _cifar_param_count(depth: int, w: int, k: int, c: int) -> int:
  n = (depth - 2) // 6
  conv = lambda ksz, cin, cout: ksz * ksz * cin * cout
  bn = lambda ch: 2 * ch
  total = conv(3, c, w) + bn(w)
  # Stage 1: n identical blocks, no projection.
  total += n * 2 * (conv(3, w, w) + bn(w))
  # Stages 2 and 3: channels double; the first block strides and projects.
  for cin, cout in ((w, 2 * w), (2 * w, 4 * w)):
    total += conv(3, cin, cout) + bn(cout) + conv(3, cout, cout) + bn(cout)
    total += conv(1, cin, cout) + bn(cout)
    total += (n - 1) * 2 * (conv(3, cout, cout) + bn(cout))
  return total + 4 * w * k + k


@pytest.mark.parametrize("depth,width,classes,in_ch", [
    (20, 16, 10, 3), (32, 16, 100, 3), (56, 16, 10, 3), (20, 5, 7, 1)])
def test_cifar_param_counts_closed_form(depth, width, classes, in_ch):
  model = nnx.eval_shape(lambda: ResNet(arch="cifar", depth=depth, num_classes=classes,
                                        width=width, in_channels=in_ch, rngs=nnx.Rngs(0)))
  expected = _cifar_param_count(depth, width, classes, in_ch)
  assert resnet.count_params(nnx.state(model, nnx.Param)) == expected
  if (depth, width, classes, in_ch) == (20, 16, 10, 3):
    assert expected == 272_474  # He et al.'s "0.27M" for ResNet-20.


# --- activation ---------------------------------------------------------------------


def test_activation_switch_changes_function():
  x = _images()
  relu = _small(activation="relu")
  leaky = _small(activation="leaky_relu", leaky_slope=0.1)
  flat = _small(activation="leaky_relu", leaky_slope=0.0)
  p_relu = nnx.to_pure_dict(nnx.state(relu, nnx.Param))
  assert _leaves_equal(p_relu, nnx.to_pure_dict(nnx.state(leaky, nnx.Param)))
  assert _leaves_equal(p_relu, nnx.to_pure_dict(nnx.state(flat, nnx.Param)))
  for m in (relu, leaky, flat):
    m.eval()
  out_relu, out_leaky, out_flat = relu(x), leaky(x), flat(x)
  assert float(jnp.max(jnp.abs(out_relu - out_leaky))) > 1e-3
  np.testing.assert_allclose(out_flat, out_relu, rtol=1e-6, atol=1e-6)


# --- batch norm modes ---------------------------------------------------------------


def test_eval_mode_leaves_statistics_untouched():
  model = _small()
  x = _images()
  before = _stats(model)

  apply, params, stats = resnet.split_apply(model)
  jax.jit(apply)(params, stats, x)
  apply(params, stats, x)
  assert _leaves_equal(before, _stats(model))
  assert model.bn_init.use_running_average is False  # split_apply left the mode alone.

  model.eval()
  model(x)
  assert _leaves_equal(before, _stats(model))

  model.train()
  model(x)
  after = _stats(model)
  assert all(not np.array_equal(a, b)
             for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_train_apply_updates_statistics_like_hand_computation():
  model = _small()
  x = _images()
  before = _stats(model)
  train_apply, params, stats = resnet.split_train_apply(model)
  # Non-default starting statistics, so the momentum term is actually exercised.
  stats = jax.tree.map(lambda s: s + 0.5, stats)
  _, new_stats = jax.jit(train_apply)(params, stats, x)

  assert _leaves_equal(before, _stats(model))  # The model itself is not touched.
  for old, new in zip(jax.tree.leaves(stats), jax.tree.leaves(new_stats)):
    assert old.shape == new.shape and not np.allclose(old, new)

  h = jax.lax.conv_general_dilated(x, params["conv_init"]["kernel"], (1, 1),
                                   ((1, 1), (1, 1)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  mean = jnp.mean(h, axis=(0, 1, 2))
  var = jnp.var(h, axis=(0, 1, 2))  # Biased, as flax uses.
  np.testing.assert_allclose(new_stats["bn_init"]["mean"],
                             0.9 * stats["bn_init"]["mean"] + 0.1 * mean,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new_stats["bn_init"]["var"],
                             0.9 * stats["bn_init"]["var"] + 0.1 * var,
                             rtol=1e-5, atol=1e-5)


def test_train_apply_normalises_with_batch_statistics():
  # In train mode the output cannot depend on the running statistics passed in.
  model = _small()
  x = _images()
  train_apply, params, stats = resnet.split_train_apply(model)
  shifted = jax.tree.map(lambda s: s + 3.0, stats)
  before = _stats(model)
  a, _ = train_apply(params, stats, x)  # Eager: nothing like jit guards the model here.
  b, _ = train_apply(params, shifted, x)
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  assert _leaves_equal(before, _stats(model))
  apply, _, _ = resnet.split_apply(model)
  assert float(jnp.max(jnp.abs(apply(params, stats, x) - apply(params, shifted, x)))) > 1e-3


# --- purity and differentiability ---------------------------------------------------


def test_split_apply_is_pure_and_matches_eval_model():
  model = _small()
  x = _images()
  train_apply, params, stats = resnet.split_train_apply(model)
  _, stats = train_apply(params, stats, _images(seed=5))  # Non-trivial running stats.
  state = nnx.state(model, nnx.BatchStat)
  nnx.replace_by_pure_dict(state, stats)
  nnx.update(model, state)
  snapshot = _stats(model)

  apply, params, stats = resnet.split_apply(model)
  jitted = jax.jit(apply)
  y1, y2 = jitted(params, stats, x), jitted(params, stats, x)
  np.testing.assert_array_equal(y1, y2)
  assert _leaves_equal(snapshot, _stats(model))

  model.eval()
  np.testing.assert_allclose(y1, model(x), rtol=1e-5, atol=1e-5)
  feats, _, _ = resnet.split_apply(model, output="features")
  np.testing.assert_allclose(feats(params, stats, x), model.features(x), rtol=1e-5, atol=1e-5)

  # String list indices, as a checkpoint round trip may produce, are accepted too.
  stringy = dict(params)
  stringy["stages"] = {str(i): {str(j): b for j, b in s.items()}
                       for i, s in params["stages"].items()}
  np.testing.assert_allclose(apply(stringy, stats, x), y1, rtol=1e-5, atol=1e-5)


def test_grad_matches_finite_difference_and_jvp():
  model = _small()
  x = _images((2, 8, 8, 3))
  apply, params, stats = resnet.split_apply(model)
  weights = _normal((2, 5), seed=2)
  leaves, treedef = jax.tree.flatten(params)
  tangent = treedef.unflatten([_normal(a.shape, seed=i) for i, a in enumerate(leaves)])
  with jax.enable_x64(True):
    to64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
    p64, s64, t64 = to64(params), to64(stats), to64(tangent)
    x64, w64 = to64(x), to64(weights)
    loss = lambda p: jnp.sum(apply(p, s64, x64) * w64)

    @jax.jit  # One compilation for both: backward convs are slow to compile on CPU.
    def grad_and_jvp(p, t):
      return jax.grad(loss)(p), jax.jvp(loss, (p,), (t,))[1]

    grads, jvp = grad_and_jvp(p64, t64)
    assert jax.tree.structure(grads) == jax.tree.structure(p64)

    jit_loss = jax.jit(loss)

    def bumped(delta: float) -> jax.Array:
      p = jax.tree.map(lambda a: a, p64)
      k = p["stages"][0][1]["conv1"]["kernel"]
      p["stages"][0][1]["conv1"]["kernel"] = k.at[1, 1, 0, 2].add(delta)
      return jit_loss(p)

    eps = 1e-5
    fd = (bumped(eps) - bumped(-eps)) / (2 * eps)
    g = grads["stages"][0][1]["conv1"]["kernel"][1, 1, 0, 2]
    assert abs(float(g)) > 1e-6
    np.testing.assert_allclose(float(g), float(fd), rtol=1e-5, atol=1e-9)

    dot = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(t64)))
    np.testing.assert_allclose(float(jvp), float(dot), rtol=1e-8)


# --- head ---------------------------------------------------------------------------


def test_replace_head():
  model = _small(num_classes=5)
  before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  out = resnet.replace_head(model, 11, rngs=nnx.Rngs(3))
  assert out is model
  after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert after["head"]["kernel"].shape == (model.feature_dim, 11)
  assert after["head"]["bias"].shape == (11,)
  assert float(jnp.std(after["head"]["kernel"])) > 1e-3
  before.pop("head"), after.pop("head")
  assert _leaves_equal(before, after)
  model.eval()
  assert model(_images()).shape == (2, 11)


# --- config -------------------------------------------------------------------------


def test_build_resnet_from_mapping():
  cfg = dict(arch="cifar", depth=20, width=4, num_classes=5, activation="relu",
             leaky_slope=0.1, in_channels=3)
  built = resnet.build_resnet(cfg, rngs=nnx.Rngs(0))
  direct = _small(activation="relu")
  assert built.activation == "relu"
  assert _leaves_equal(nnx.state(built, nnx.Param), nnx.state(direct, nnx.Param))


@pytest.mark.parametrize("overrides,needles", [
    ({"arch": "vgg"}, ("'vgg'", "cifar", "imagenet")),
    ({"depth": 18}, ("18", "8", "20", "32", "56")),
    ({"arch": "imagenet", "depth": 20}, ("20", "18", "34", "50")),
    ({"width": 0}, ("width", "got 0")),
    ({"num_classes": -3}, ("num_classes", "-3")),
    ({"activation": "gelu"}, ("'gelu'", "relu", "leaky_relu")),
    ({"leaky_slope": 1.0}, ("leaky_slope", "1.0", "[0, 1)")),
    ({"leaky_slope": -0.2}, ("leaky_slope", "-0.2")),
])
def test_bad_config_raises_value_error_naming_value(overrides, needles):
  kw = dict(arch="cifar", depth=20, width=4, num_classes=5)
  kw.update(overrides)
  with pytest.raises(ValueError) as info:
    ResNet(**kw, rngs=nnx.Rngs(0))
  message = str(info.value)
  assert "\n" not in message
  for needle in needles:
    assert needle in message


def test_joint_outputs_are_the_logits_and_the_embedding_of_one_pass():
  model = _small()
  x = _images()
  apply, params, stats = resnet.split_apply(model)
  feats, _, _ = resnet.split_apply(model, output="features")
  both, _, _ = resnet.split_apply(model, output="both")
  logits, emb = both(params, stats, x)
  np.testing.assert_allclose(logits, apply(params, stats, x), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(emb, feats(params, stats, x), rtol=1e-6, atol=1e-6)
  train_apply, _, _ = resnet.split_train_apply(model)
  train_both, _, _ = resnet.split_train_apply(model, output="both")
  (t_logits, t_emb), t_stats = train_both(params, stats, x)
  ref_logits, ref_stats = train_apply(params, stats, x)
  np.testing.assert_allclose(t_logits, ref_logits, rtol=1e-6, atol=1e-6)
  assert t_emb.shape == emb.shape and _leaves_equal(t_stats, ref_stats)
  for point in resnet.SPLIT_POINTS:
    prefix, suffix = resnet.split_at(model, point, output="joint")
    joint = suffix(params, stats, prefix(params, stats, x))
    np.testing.assert_allclose(joint, jnp.concatenate([logits, emb], -1), rtol=1e-5,
                               atol=1e-5)
  with pytest.raises(ValueError, match="unknown output"):
    resnet.split_at(model, "head", output="features")
