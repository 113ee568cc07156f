"""Importing torchvision/timm ResNet weights, on stand-in state dicts that carry the real
key names and shapes (made here, from torchvision's definition of the network)."""

import json

from cli_helpers import assert_one_line_error, run_cli
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from lqf.errors import UserError
from lqf.experiments import import_weights, pretrain
from lqf.models import weights

LAYOUTS = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3))}


def torchvision_shapes(depth, width=64, num_classes=1000, in_channels=3):
  """{name: shape} of torchvision's `resnet{depth}().state_dict()`, written out from
  torchvision/models/resnet.py (v1.5), independently of `lqf.weights`."""
  kind, blocks = LAYOUTS[depth]
  out = {}

  def bn(name, c):
    out.update({f"{name}.weight": (c,), f"{name}.bias": (c,), f"{name}.running_mean": (c,),
                f"{name}.running_var": (c,), f"{name}.num_batches_tracked": ()})

  out["conv1.weight"] = (width, in_channels, 7, 7)
  bn("bn1", width)
  inplanes = width
  for s, n in enumerate(blocks):
    planes = width * 2 ** s
    for b in range(n):
      p = f"layer{s + 1}.{b}"
      stride = 2 if (b == 0 and s > 0) else 1
      if kind == "basic":
        out[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
        bn(f"{p}.bn1", planes)
        out[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
        bn(f"{p}.bn2", planes)
        cout = planes
      else:
        out[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
        bn(f"{p}.bn1", planes)
        out[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
        bn(f"{p}.bn2", planes)
        out[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
        bn(f"{p}.bn3", planes * 4)
        cout = planes * 4
      if stride != 1 or inplanes != cout:
        out[f"{p}.downsample.0.weight"] = (cout, inplanes, 1, 1)
        bn(f"{p}.downsample.1", cout)
      inplanes = cout
  out["fc.weight"] = (num_classes, inplanes)
  out["fc.bias"] = (num_classes,)
  return out


def stand_in(depth, width, num_classes=7, seed=0):
  rng = np.random.default_rng(seed)
  sd = {}
  for k, shape in torchvision_shapes(depth, width, num_classes).items():
    if k.endswith("num_batches_tracked"):
      sd[k] = np.asarray(100, np.int64)
    elif k.endswith("running_var"):
      sd[k] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    elif k.endswith(("bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight")):
      sd[k] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:
      fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
      sd[k] = (rng.normal(size=shape) / np.sqrt(fan_in)).astype(np.float32)
  return sd


@pytest.mark.parametrize("depth,params,keys", [(18, 11_689_512, 122), (50, 25_557_032, 320)])
def test_stand_in_has_torchvisions_key_count_and_size(depth, params, keys):
  shapes = torchvision_shapes(depth)
  assert len(shapes) == keys
  learnable = [s for k, s in shapes.items() if not k.endswith(
      ("running_mean", "running_var", "num_batches_tracked"))]
  assert sum(int(np.prod(s)) for s in learnable) == params


def reference_forward(sd, x_nchw, depth, activation="relu", slope=0.1):
  """Torch's ResNet forward in eval mode, in torch's layouts (NCHW, OIHW)."""
  act = (lambda y: jnp.maximum(y, 0)) if activation == "relu" else \
      (lambda y: jnp.where(y >= 0, y, slope * y))

  def conv(x, name, stride, pad):
    return jax.lax.conv_general_dilated(x, sd[f"{name}.weight"], (stride, stride),
                                        ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                        precision="highest")

  def bn(x, name):
    c = lambda k: sd[f"{name}.{k}"][None, :, None, None]
    return (x - c("running_mean")) / jnp.sqrt(c("running_var") + 1e-5) * c("weight") + c("bias")

  kind, blocks = LAYOUTS[depth]
  y = act(bn(conv(x_nchw, "conv1", 2, 3), "bn1"))
  y = jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 1, 3, 3), (1, 1, 2, 2),
                            ((0, 0), (0, 0), (1, 1), (1, 1)))
  for s, n in enumerate(blocks):
    for b in range(n):
      p = f"layer{s + 1}.{b}"
      stride = 2 if (b == 0 and s > 0) else 1
      if kind == "basic":
        z = act(bn(conv(y, f"{p}.conv1", stride, 1), f"{p}.bn1"))
        z = bn(conv(z, f"{p}.conv2", 1, 1), f"{p}.bn2")
      else:
        z = act(bn(conv(y, f"{p}.conv1", 1, 0), f"{p}.bn1"))
        z = act(bn(conv(z, f"{p}.conv2", stride, 1), f"{p}.bn2"))
        z = bn(conv(z, f"{p}.conv3", 1, 0), f"{p}.bn3")
      short = bn(conv(y, f"{p}.downsample.0", stride, 0), f"{p}.downsample.1") \
          if f"{p}.downsample.0.weight" in sd else y
      y = act(z + short)
  feats = y.mean(axis=(2, 3))
  return feats @ sd["fc.weight"].T + sd["fc.bias"]


@pytest.mark.parametrize("depth,width,fmt", [(18, 8, ".safetensors"), (50, 4, ".npz")])
def test_imported_model_computes_what_torch_computes(tmp_path, depth, width, fmt):
  sd = stand_in(depth, width)
  path = str(tmp_path / f"w{fmt}")
  if fmt == ".npz":
    np.savez(path, **{f"module.{k}": v for k, v in sd.items()})  # A DDP-wrapped export.
  else:
    save_file(sd, path)
  report = import_weights.import_run(path, str(tmp_path / "run"), activation="relu")
  assert report.architecture == weights.Architecture(depth, width, 7, 3)
  assert report.unmapped == [] and len(report.ignored) == sum(
      k.endswith("num_batches_tracked") for k in sd)
  assert report.mapped == len(sd) - len(report.ignored)
  cfg, clf = pretrain.load_pretrained(str(tmp_path / "run"))
  assert cfg["model"]["activation"] == "relu"
  x = np.random.default_rng(1).normal(size=(2, 3, 64, 64)).astype(np.float32)
  ours = clf.apply(clf.params, clf.batch_stats, jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(ours, reference_forward(sd, x, depth), rtol=2e-4, atol=2e-4)


def test_leaky_relu_is_the_default_and_changes_the_function(tmp_path):
  sd = stand_in(18, 4)
  path = str(tmp_path / "w.safetensors")
  save_file(sd, path)
  report = import_weights.import_run(path, str(tmp_path / "run"))
  assert "leaky_relu" in report.summary()
  _, clf = pretrain.load_pretrained(str(tmp_path / "run"))
  x = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
  ours = clf.apply(clf.params, clf.batch_stats, jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(ours, reference_forward(sd, x, 18, "leaky_relu"), rtol=2e-4,
                             atol=2e-4)
  assert not np.allclose(ours, reference_forward(sd, x, 18, "relu"), atol=1e-3)
  record = json.load(open(tmp_path / "run" / "import_report.json"))
  assert record["architecture"]["depth"] == 18 and record["unmapped"] == []


def test_extra_tensors_are_reported_and_bad_ones_refused(tmp_path):
  sd = stand_in(18, 4)
  _, _, _, report = weights.convert(dict(sd, **{"aux.weight": np.zeros(3, np.float32)}))
  assert report.unmapped == ["aux.weight"] and "aux.weight" in report.summary()
  missing = {k: v for k, v in sd.items() if k != "layer2.0.bn1.running_var"}
  with pytest.raises(UserError, match="missing layer2.0.bn1.running_var"):
    weights.convert(missing)
  wrong = dict(sd, **{"layer1.0.conv1.weight": np.zeros((4, 4, 5, 5), np.float32)})
  with pytest.raises(UserError, match=r"layer1.0.conv1.weight has shape \(4, 4, 5, 5\)"):
    weights.convert(wrong)
  with pytest.raises(UserError, match="not a torchvision/timm ResNet"):
    weights.convert({"encoder.weight": np.zeros(3, np.float32)})
  odd = {k: v for k, v in sd.items() if not k.startswith("layer4.1.")}
  with pytest.raises(UserError, match=r"\[2, 2, 2, 1\] blocks per stage"):
    weights.convert(odd)


def test_cli_import_and_its_errors(tmp_path):
  path = str(tmp_path / "w.safetensors")
  save_file(stand_in(18, 4), path)
  proc = run_cli("import-weights", "--weights", path, "--workdir", str(tmp_path / "run"))
  assert proc.returncode == 0, proc.stderr
  assert "ResNet-18 (width 4, 7 classes" in proc.stdout
  for args, match in [
      (("--weights", str(tmp_path / "none.safetensors")), "does not exist"),
      (("--weights", str(tmp_path / "w.onnx")), "unknown format"),
      (("--weights", str(tmp_path / "broken.safetensors")), "cannot be read")]:
    open(tmp_path / "w.onnx", "w").write("x")
    open(tmp_path / "broken.safetensors", "wb").write(b"\x00" * 10)
    out = tmp_path / "out"
    assert_one_line_error(run_cli("import-weights", *args, "--workdir", str(out)), match)
    assert not out.exists()


def test_pth_needs_torch_or_reads_it(tmp_path):
  path = str(tmp_path / "w.pth")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    open(path, "wb").write(b"PK")
    with pytest.raises(UserError, match="needs PyTorch"):
      weights.read_state_dict(path)
    return
  sd = stand_in(18, 4)
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, path)
  read = weights.read_state_dict(path)
  assert read.keys() == sd.keys()
  np.testing.assert_array_equal(read["fc.weight"], sd["fc.weight"])
