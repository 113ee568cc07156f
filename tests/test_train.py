import json
import os

import jax
import numpy as np
import pytest

from lqf.errors import UserError
from lqf.experiments import pretrain
from lqf.models.classifier import build_classifier
from lqf.runtime import checkpoint, train


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_array_equal(x, y)


def _final_state(workdir, cfg):
  _, clf = pretrain.load_pretrained(str(workdir))
  return {"params": clf.params, "batch_stats": clf.batch_stats}


def test_checkpoint_round_trip(tmp_path):
  state = {"params": {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3)},
           "step": np.int32(7)}
  mgr = checkpoint.manager(str(tmp_path))
  checkpoint.save(mgr, 7, state)
  mgr.wait_until_finished()
  like = jax.tree.map(np.zeros_like, state)
  restored, step = checkpoint.restore_latest(mgr, like)
  assert step == 7
  _assert_trees_equal(restored, state)


def test_pretrain_is_deterministic_and_learns(tiny_config, tmp_path):
  a = pretrain.pretrain(tiny_config, str(tmp_path / "a"), progress=False)
  b = pretrain.pretrain(tiny_config, str(tmp_path / "b"), progress=False)
  _assert_trees_equal(_final_state(tmp_path / "a", tiny_config),
                      _final_state(tmp_path / "b", tiny_config))
  assert a == b
  assert a["eval"]["count"] == 600
  records = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
  assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
  assert [r["step"] for r in records if r["split"] == "eval"] == [3, 6]
  assert sorted(os.listdir(tmp_path / "a" / "checkpoints")) == ["2", "4", "6"]


def test_interrupted_run_resumes_to_the_same_parameters(tiny_config, tmp_path):
  pretrain.pretrain(tiny_config, str(tmp_path / "full"), progress=False)
  # Stopped after 3 steps; the checkpoint is at step 2, so step 3 is redone.
  pretrain.pretrain(tiny_config, str(tmp_path / "cut"), stop_at_step=3, progress=False)
  assert not (tmp_path / "cut" / "final_metrics.json").exists()
  resumed = pretrain.pretrain(tiny_config, str(tmp_path / "cut"), progress=False)
  _assert_trees_equal(_final_state(tmp_path / "full", tiny_config),
                      _final_state(tmp_path / "cut", tiny_config))
  full = json.load(open(tmp_path / "full" / "final_metrics.json"))
  assert resumed == full
  steps = [json.loads(l)["step"] for l in open(tmp_path / "cut" / "metrics.jsonl")]
  assert steps == [json.loads(l)["step"] for l in open(tmp_path / "full" / "metrics.jsonl")]


def test_workdir_of_another_architecture_is_refused(tiny_config, tmp_path):
  pretrain.pretrain(tiny_config, str(tmp_path), stop_at_step=2, progress=False)
  before = sorted(p.name for p in tmp_path.rglob("*"))
  tiny_config.model.depth = 32
  with pytest.raises(UserError, match="different architecture .*model.depth"):
    pretrain.pretrain(tiny_config, str(tmp_path), progress=False)
  assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_load_pretrained_refuses_an_unfinished_run(tiny_config, tmp_path):
  pretrain.pretrain(tiny_config, str(tmp_path), stop_at_step=2, progress=False)
  with pytest.raises(UserError, match="has not finished"):
    pretrain.load_pretrained(str(tmp_path))


def test_a_loss_on_logits_and_embedding_trains_like_its_logits_part(tiny_config):
  from lqf.data import pipeline
  d = tiny_config.data
  data = pipeline.load_split(d, d.train_split, corrupted=False, shots=2, subset_seed=0)
  clf = build_classifier(tiny_config.model, 10, 1, 0)
  plain = train.fit(clf, data, tiny_config.train, seed=0, progress=False)
  seen = []
  pair = lambda out, labels, extras: seen.append(out[1].shape) or train.cross_entropy(
      out[0], labels)
  both = train.fit(clf, data, tiny_config.train, seed=0, progress=False, loss=pair,
                   with_features=True)
  _assert_trees_equal(plain, both)
  assert seen and seen[0][-1] == 4 * tiny_config.model.width


def test_pretrained_for_restores_once_and_checks_channels(pretrained):
  a = pretrain.pretrained_for(pretrained, 1)
  assert pretrain.pretrained_for(pretrained, 1)[1] is a[1]  # Restored once per process.
  record = os.path.join(pretrained, checkpoint.CONFIG_FILE)
  stat = os.stat(record)
  os.utime(record, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
  b = pretrain.pretrained_for(pretrained, 1)  # A rewritten record is read again.
  assert b[1] is not a[1]
  _assert_trees_equal(a[1].params, b[1].params)
  with pytest.raises(UserError, match="pretrained on 1-channel images but data.channels is 3"):
    pretrain.pretrained_for(pretrained, 3)


def test_evaluation_pads_the_last_batch_and_counts_only_real_images():
  from lqf.data import pipeline  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  data = pipeline.ImageSplit(rng.normal(size=(10, 2, 2, 1)).astype(np.float32),
                             rng.integers(0, 3, size=10).astype(np.int32), 3,
                             np.zeros(1, np.float32))
  batches = list(pipeline.padded_eval_batches(data, 4))
  assert [b[0].shape for b in batches] == [(4, 2, 2, 1)] * 3
  assert [len(b[1]) for b in batches] == [4, 4, 2]
  np.testing.assert_array_equal(np.concatenate([b[0][:len(b[1])] for b in batches]),
                                data.images)
  assert not batches[-1][0][2:].any()
  w = rng.normal(size=(4, 3)).astype(np.float32)
  shapes = set()

  def apply(params, batch_stats, x):
    shapes.add(x.shape)
    return x.reshape(len(x), -1) @ params

  logits = data.images.reshape(10, -1) @ w  # Brute force, one batch.
  z = logits - logits.max(-1, keepdims=True)
  ce = np.log(np.exp(z).sum(-1)) - z[np.arange(10), data.labels]
  result = train.evaluate(apply, w, {}, data, batch_size=4)
  assert result["accuracy"] == np.mean(logits.argmax(-1) == data.labels)
  assert result["loss"] == pytest.approx(ce.mean(), rel=1e-5) and result["count"] == 10
  assert shapes == {(4, 2, 2, 1)}  # Traced once: the padded last batch has the same shape.
  assert train.accuracy(lambda x: x.reshape(len(x), -1) @ w, data, 4) == result["accuracy"]
