"""prsl_jax.evaluation: the cascade's arithmetic, its soundness checks, reports.

Tiny models (linear, one-hidden-layer MLP, a rounding model with zero input
gradients) on random 6x6 RGB images; a few attack steps. Module-level logits
functions let evaluation's compile cache serve every test.
"""

import dataclasses
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prsl_jax import attacks
from prsl_jax import evaluation
from prsl_jax import reports
from tests import processes

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

N, S, C = 32, 6, 10
FAST = dict(steps=5, square_queries=40, batch_size=16)


def _evaluate(fn, params, source, idx, *, suite, steps=5, square_queries=40, norm="linf",
              **kw):
  """evaluation.evaluate with one suite, as a dict with that suite's results."""
  attack_list = evaluation.make_suite(suite, norm, steps=steps, queries=square_queries)
  r = evaluation.evaluate(fn, params, source, idx, suites={"s": attack_list}, norm=norm,
                          progress_bar=False, **kw).to_dict()
  return dict(r, robust=r["robust"]["s"], suite=[a["name"] for a in r["suites"]["s"]],
              steps=attack_list[0].steps)


class ArraySource:
  """Random-access source over arrays, like prsl_jax.data's."""

  def __init__(self, images, labels):
    self.images, self.labels = images, labels

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": np.int32(self.labels[i])}


def linear(params, images):
  return images.reshape(images.shape[0], -1) @ params["w"] + params["b"]


def mlp(params, images):
  return jnp.tanh(images.reshape(images.shape[0], -1) @ params["w1"]) @ params["w2"]


def rounded(params, images):
  # Quantised input, no gradient through it: gradients are exactly zero, yet the
  # logits still move when pixels cross a rounding boundary.
  q = jax.lax.stop_gradient(jnp.round(images * 2) / 2)
  return linear(params, q)


def _problem(fn, params, seed=0, n=N):
  rng = np.random.default_rng(seed)
  x = rng.uniform(0, 1, (n, S, S, 3)).astype(np.float32)
  y = np.asarray(jnp.argmax(fn(params, x), -1)).astype(np.int32)
  y[:3] = (y[:3] + 1) % C  # a few clean mistakes
  return ArraySource(x, y), np.arange(n)


def _linear_params(seed=0):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(S * S * 3, C)), jnp.float32),
          "b": jnp.zeros(C, jnp.float32)}


def _mlp_params(seed=0):
  rng = np.random.default_rng(seed)
  return {"w1": jnp.asarray(0.3 * rng.normal(size=(S * S * 3, 64)), jnp.float32),
          "w2": jnp.asarray(rng.normal(size=(64, C)), jnp.float32)}


def _strip_times(results):
  return {**{k: v for k, v in results.items() if k not in ("seconds", "timing")},
          "robust": [{k: v for k, v in r.items() if k not in ("seconds", "seconds_by_attack")}
                     for r in results["robust"]]}


@pytest.fixture(scope="module")
def lin():
  params = _linear_params()
  source, idx = _problem(linear, params)
  return params, source, idx


def test_eps0_is_clean_and_robust_accuracy_falls_with_eps(lin):
  params, source, idx = lin
  eps = [0.0, 1 / 255, 2 / 255, 4 / 255, 16 / 255]
  r = _evaluate(linear, params, source, idx, eps_list=eps, suite="fast", **FAST)
  clean = r["clean_accuracy"]
  assert clean == pytest.approx((N - 3) / N)  # the 3 flipped labels
  at0 = r["robust"][0]
  assert at0["robust_accuracy"] == clean
  assert all(v == clean for v in at0["accuracy_after"].values())
  assert sum(at0["broken"].values()) == 0
  acc = [e["robust_accuracy"] for e in r["robust"]]
  assert all(a >= b for a, b in zip(acc, acc[1:])), acc
  assert acc[-1] < acc[1] <= clean  # the budgets matter: it is not a constant
  for e in r["robust"]:
    after = list(e["accuracy_after"].values())
    assert all(a >= b for a, b in zip(after, after[1:]))  # cumulative
    assert after[-1] == e["robust_accuracy"]
    # Worst case per example: robust = survived every attack; mistakes never robust.
    mask = np.asarray(e["robust_mask"])
    assert mask.mean() == e["robust_accuracy"]
    assert not mask[:3].any()
    assert [b for b in e["broken_by"][:3]] == ["clean"] * 3
    assert all((b is None) == m for b, m in zip(e["broken_by"], mask))
  assert r["checks"]["passed"], r["checks"]
  assert r["indices"] == list(range(N))
  for e in r["robust"]:  # each attack's own time, within the cascade's
    assert list(e["seconds_by_attack"]) == r["suite"]
    assert 0 < sum(e["seconds_by_attack"].values()) <= e["seconds"]


def test_more_steps_never_raise_robust_accuracy():
  params = _mlp_params()
  source, idx = _problem(mlp, params)
  eps = [2 / 255, 6 / 255, 12 / 255]
  kw = dict(FAST, eps_list=eps, suite=["apgd-ce"])
  few = _evaluate(mlp, params, source, idx, **dict(kw, steps=1))
  many = _evaluate(mlp, params, source, idx, **dict(kw, steps=20))
  acc_few = [e["robust_accuracy"] for e in few["robust"]]
  acc_many = [e["robust_accuracy"] for e in many["robust"]]
  assert all(m <= f for m, f in zip(acc_many, acc_few)), (acc_many, acc_few)
  assert sum(acc_many) < sum(acc_few)  # steps reach the attack: 1 step is weaker here
  assert (few["steps"], many["steps"]) == (1, 20)


def test_cascade_is_worst_case_of_its_attacks_and_plain_model_is_silent(lin):
  params, source, idx = lin
  eps = [2 / 255, 6 / 255]
  with warnings.catch_warnings():
    warnings.simplefilter("error", evaluation.SoundnessWarning)  # plain: no warning
    cascade = _evaluate(linear, params, source, idx, eps_list=eps,
                                  suite="standard", **FAST)
    alone = {a: _evaluate(linear, params, source, idx, eps_list=eps,
                                    suite=[a], **FAST)
             for a in evaluation.SUITES["standard"]}
  assert cascade["checks"]["passed"] and not cascade["checks"]["gradient_masking"]
  for i in range(len(eps)):
    worst = cascade["robust"][i]
    for name, res in alone.items():
      assert worst["robust_accuracy"] <= res["robust"][i]["robust_accuracy"], name
      # Per example too: a point one attack breaks alone is broken in the cascade
      # (same per-example keys wherever the attack sits in the suite).
      assert not np.any(np.asarray(worst["robust_mask"])
                        & ~np.asarray(res["robust"][i]["robust_mask"])), name
    # The first attack of the cascade is that attack alone.
    assert worst["accuracy_after"]["apgd-ce"] == alone["apgd-ce"]["robust"][i]["robust_accuracy"]
  assert cascade["robust"][-1]["robust_accuracy"] < cascade["clean_accuracy"]


def test_masking_warning_fires_on_a_rounding_model():
  params = _linear_params(1)
  source, idx = _problem(rounded, params, seed=1)
  with pytest.warns(evaluation.SoundnessWarning) as record:
    r = _evaluate(rounded, params, source, idx, eps_list=[8 / 255],
                            suite=["apgd-ce", "square"], **FAST)
  masking = [w for w in record if w.category is evaluation.GradientMaskingWarning]
  assert len(masking) == 1 and "gradient masking" in str(masking[0].message)
  e = r["robust"][0]
  assert e["gradient_masking"] and r["checks"]["gradient_masking"]
  assert e["broken"]["square"] > 0  # the black-box attack did what APGD could not
  assert r["checks"]["zero_gradient_fraction"] == 1.0
  assert not r["checks"]["gradients_ok"] and not r["checks"]["passed"]
  assert any("gradient masking" in w for w in r["checks"]["warnings"])
  assert "MASKING" in reports.format_table({"rounded": dict(r, robust={"s": r["robust"]},
                                                            suites={"s": []})})


def test_same_seed_same_numbers(lin):
  params, source, idx = lin
  kw = dict(eps_list=[4 / 255], suite=["apgd-ce", "square"], **FAST)
  a = _evaluate(linear, params, source, idx, seed=3, **kw)
  b = _evaluate(linear, params, source, idx, seed=3, **kw)
  assert _strip_times(a) == _strip_times(b)
  assert a["seed"] == 3


def test_an_example_draws_the_same_randomness_in_any_batch():
  # Keys are per example (fold_in of its source index), so its outcome depends
  # neither on the batch size nor on which other examples are evaluated.
  params = _mlp_params()
  source, idx = _problem(mlp, params)
  kw = dict(FAST, eps_list=[4 / 255], suite=["square"], square_queries=8)
  full = _evaluate(mlp, params, source, idx, **kw)
  part = _evaluate(mlp, params, source, idx[1::2], **dict(kw, batch_size=8))
  got = part["robust"][0]["broken_by"]
  assert got == full["robust"][0]["broken_by"][1::2]
  # Random search with 8 queries breaks some points and not others: the
  # comparison above is about the random draws, not a foregone conclusion.
  assert 0 < sum(b == "square" for b in got) < sum(b != "clean" for b in got)


def test_out_of_ball_images_are_flagged_and_not_counted(lin, monkeypatch):
  params, source, idx = lin

  def too_far(attack, fn, x, y, call):
    del attack, fn, y  # outside, even at eps=0
    return jnp.clip(x + 2 * call.eps + 0.01, 0, 1)

  monkeypatch.setitem(evaluation.ATTACKS, "fgsm",
                      dataclasses.replace(evaluation.ATTACKS["fgsm"], run=too_far))
  with pytest.warns(evaluation.SoundnessWarning):
    r = _evaluate(linear, params, source, idx, eps_list=[8 / 255],
                            suite=["fgsm"], **dict(FAST, batch_size=8))
  e = r["robust"][0]
  assert e["outside_ball"] > 0 and e["max_ball_excess"] > 1e-3
  assert e["robust_accuracy"] == r["clean_accuracy"]  # nothing outside counts
  assert not r["checks"]["ball_ok"] and not r["checks"]["eps0_ok"]
  assert r["checks"]["eps0"]["fgsm"]["max_distance"] > 0


def test_nondeterministic_logits_are_flagged(lin):
  params, source, idx = lin
  calls = []

  def noisy(params, images):
    # A fresh random offset at every trace: a stochastic "defence".
    calls.append(1)
    noise = np.random.default_rng(len(calls)).normal(size=(C,)).astype(np.float32)
    return linear(params, images) + 10 * noise

  with pytest.warns(evaluation.SoundnessWarning) as record:
    r = _evaluate(noisy, params, source, idx, eps_list=[1 / 255],
                            suite=["fgsm"], **FAST)
  assert any("not deterministic" in str(w.message) for w in record)
  assert not r["checks"]["deterministic"] and r["checks"]["logits_max_abs_diff"] > 0.1


def test_bad_arguments_fail_before_any_compute(lin):
  params, source, idx = lin
  kw = dict(eps_list=[1 / 255], **FAST)
  with pytest.raises(ValueError, match="unknown suite"):
    _evaluate(linear, params, source, idx, suite="strong", **kw)
  with pytest.raises(ValueError, match="unknown attack"):
    _evaluate(linear, params, source, idx, suite=["apgd-ce", "fab"], **kw)
  with pytest.raises(ValueError, match="exceeds 1"):
    _evaluate(linear, params, source, idx, suite="fast", **dict(kw, eps_list=[4.0]))
  with pytest.raises(ValueError, match=">= 0"):
    _evaluate(linear, params, source, idx, suite="fast",
                        **dict(kw, eps_list=[1 / 255, -1 / 255]))
  with pytest.raises(ValueError, match="linf"):
    _evaluate(linear, params, source, idx, suite=["fgsm"], norm="l2", **kw)
  with pytest.raises(ValueError, match="steps"):
    _evaluate(linear, params, source, idx, suite="fast", **dict(kw, steps=0))
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("batch",))
  with pytest.raises(ValueError, match="'data' axis"):
    _evaluate(linear, params, source, idx, suite="fast", mesh=mesh, **kw)


def test_l2_budget_respected(lin):
  params, source, idx = lin
  r = _evaluate(linear, params, source, idx, eps_list=[0.0, 0.5], norm="l2",
                          suite=["pgd-cw"], **FAST)
  assert r["checks"]["passed"], r["checks"]
  assert r["robust"][0]["robust_accuracy"] == r["clean_accuracy"]
  assert r["robust"][1]["robust_accuracy"] < r["clean_accuracy"]
  assert r["robust"][1]["max_ball_excess"] <= 1e-4


_SHARDED = textwrap.dedent("""
    import json, os, sys
    process_id, port = int(sys.argv[2]), sys.argv[3]
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=process_id)
    import numpy as np
    from tests import test_evaluation as t  # PYTHONPATH: the repository root
    from prsl_jax import evaluation
    params = t._mlp_params()
    source, idx = t._problem(t.mlp, params, n=30)  # 30: the last batch is padded
    kw = dict(eps_list=[2 / 255, 8 / 255], suite=["apgd-ce", "square"],
              **dict(t.FAST, batch_size=8))
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    out = {"devices": len(jax.devices())}
    out["one"] = t._strip_times(t._evaluate(t.mlp, params, source, idx, **kw))
    out["mesh"] = t._strip_times(t._evaluate(t.mlp, params, source, idx,
                                                     mesh=mesh, **kw))
    try:
      t._evaluate(t.mlp, params, source, idx, mesh=mesh, **dict(kw, batch_size=6))
    except ValueError as e:
      out["error"] = str(e)
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.heavy(25)
def test_two_processes_four_devices_match_one_device(tmp_path):
  # Two processes on localhost with 2 CPU devices each: the multi-host path
  # (global arrays from every process's copy of the batch, gathered outputs).
  script = tmp_path / "sharded.py"
  script.write_text(_SHARDED)
  env = processes.env(2, pythonpath=[_ROOT])
  results, report, _ = processes.launch(
      lambda port: [[sys.executable, str(script), __file__, str(i), str(port)] for i in range(2)],
      env=env, timeout=400)
  outs = []
  for rc, stdout, _ in results:
    assert rc == 0, report
    import json  # pylint: disable=g-import-not-at-top
    outs.append(json.loads(stdout.split("RESULT", 1)[1]))
  assert outs[0] == outs[1]  # every process reads the same, complete results
  out = outs[0]
  assert out["devices"] == 4
  one, mesh = out["one"], out["mesh"]
  assert (one["num_devices"], mesh["num_devices"]) == (1, 4)
  for a, b in zip(one["robust"], mesh["robust"]):
    assert a["robust_mask"] == b["robust_mask"] and a["broken_by"] == b["broken_by"]
    assert a["accuracy_after"] == b["accuracy_after"]
  assert one["robust"][-1]["robust_accuracy"] < one["clean_accuracy"]
  assert "divisible" in out["error"] and "(4)" in out["error"]


def _fake_results(norm="linf", eps=(1 / 255, 4 / 255), acc=(0.5, 0.25), clean=0.75):
  return {"norm": norm, "suites": {"standard": [{"name": "apgd-ce"}, {"name": "square"}]},
          "clean_accuracy": clean, "checks": {"passed": True},
          "robust": {"standard": [{"eps": e, "robust_accuracy": a,
                                   "accuracy_after": {"apgd-ce": a + 0.125, "square": a}}
                                  for e, a in zip(eps, acc)]}}


def test_format_table_and_plot(tmp_path):
  results = {"base": _fake_results(),
             "prsl": _fake_results(eps=(4 / 255,), acc=(0.375,), clean=0.875)}
  table = reports.format_table(results)
  lines = table.splitlines()
  assert lines[0] == "| model | attack | clean | ε=1/255 | ε=4/255 | checks |"
  label = reports.SUITE_LABELS["standard"]
  assert lines[2] == f"| base | {label} | 75.0 | 50.0 | 25.0 | ok |"
  assert lines[3] == f"| prsl | {label} | 87.5 | – | 37.5 | ok |"  # eps it was not run at
  assert f"| base | {label} | 4/255 | apgd-ce 37.5 → square 25.0 |" in lines
  path = reports.plot(results, str(tmp_path / "r.png"))
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(path) > 5000


def _compiled():
  """Entries in the evaluation's jit caches (one per compiled program)."""
  fns = (evaluation._clean_batch, evaluation._logits_batch, evaluation._attack_batch)  # pylint: disable=protected-access
  return [f._cache_size() for f in fns]  # pylint: disable=protected-access


@pytest.mark.heavy(30)
def test_checkpoints_of_one_config_share_compilations_and_are_not_pinned(tiny_ckpt,
                                                                          tiny_clip):
  import gc  # pylint: disable=g-import-not-at-top
  import weakref  # pylint: disable=g-import-not-at-top
  import prsl_jax  # pylint: disable=g-import-not-at-top
  from prsl_jax import zeroshot  # pylint: disable=g-import-not-at-top
  model, params, tokenizer = tiny_clip
  class_emb = zeroshot.class_embeddings(model, params, tokenizer, ["cat", "dog", "zero"])
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (8, model.image_size, model.image_size, 3)).astype(np.float32)
  y = np.asarray(jnp.argmax(zeroshot.logits(model, params, class_emb, x), -1), np.int32)
  source = ArraySource(x, y)
  suites = {"s": evaluation.make_suite(["fgsm", "pgd-ce"], steps=2)}

  def run(model, params):
    return evaluation.evaluate(zeroshot.Classifier(model),
                               {"params": params, "class_emb": class_emb}, source,
                               np.arange(8), eps_list=[1 / 255, 2 / 255], suites=suites,
                               batch_size=8, progress_bar=False)
  first = run(model, params)
  before = _compiled()
  # A second checkpoint of the same architecture: another load, other weights.
  other = prsl_jax.load_pretrained(tiny_ckpt.path)
  assert other.model == model and other.model is not model
  other_params = jax.tree.map(lambda p: p * 1.01, other.params)
  leaf = weakref.ref(jax.tree.leaves(other_params)[0])
  second = run(other.model, other_params)
  assert _compiled() == before  # nothing compiled for the second checkpoint
  assert len(second.robust["s"]) == 2 and second.num_examples == first.num_examples
  del other, other_params, second
  gc.collect()
  assert leaf() is None  # no cache kept the dropped checkpoint's params alive


def _fresh_linear():
  """A new model function object: its programs are compiled afresh."""
  def fn(params, images):
    return linear(params, images)
  return fn


def test_compilations_do_not_grow_with_budgets_and_eps0_reuses_the_attacks(lin):
  from prsl_jax import compilation  # pylint: disable=g-import-not-at-top
  params, source, idx = lin
  suites = {"s": evaluation.make_suite(["apgd-ce", "square"], steps=2, queries=4)}
  kw = dict(suites=suites, batch_size=16, progress_bar=False)
  evaluation.evaluate(_fresh_linear(), params, source, idx, eps_list=[1 / 255], **kw)  # warm
  counts = []
  for eps_list in ([1 / 255], [1 / 255, 2 / 255, 8 / 255]):
    with compilation.Timer() as timer:
      r = evaluation.evaluate(_fresh_linear(), params, source, idx, eps_list=eps_list, **kw)
    counts.append(timer.compiles)
    assert r.timing["compiles"] == timer.compiles and r.timing["attack_seconds"] > 0
  # One program each for the clean pass and the determinism check, and one per
  # attack and batch size (16 and 8); the eps=0 check compiles every size, so the
  # budgets, whatever points they leave, compile nothing more.
  assert r.batch_sizes == [16, 8]
  assert counts == [6, 6], counts
  with compilation.Timer() as timer:
    one = evaluation.evaluate(_fresh_linear(), params, source, idx, eps_list=[1 / 255],
                              buckets=1, **kw)
  assert one.batch_sizes == [16] and timer.compiles == 4, timer.as_dict()


def test_smaller_batches_for_the_last_points_change_no_outcome(monkeypatch):
  # Per-example keys: a point's attack does not depend on the batch it sits in,
  # so padding the points to 8 rows instead of 16 changes no outcome. 10 points,
  # 7 of them correct: every stage runs in the smaller batch, and breaks some.
  params = _mlp_params()
  source, idx = _problem(mlp, params, n=10)
  kw = dict(suites={"s": evaluation.make_suite(["apgd-ce", "square"], steps=3, queries=6)},
            batch_size=16, progress_bar=False, eps_list=[2 / 255, 4 / 255])
  rows = []  # the batch size of every attack call
  attack_batch = evaluation._attack_batch  # pylint: disable=protected-access
  def counting(variables, x, *args, **kwargs):
    rows.append(x.shape[0])
    return attack_batch(variables, x, *args, **kwargs)
  monkeypatch.setattr(evaluation, "_attack_batch", counting)
  rs = []
  for k in (1, 3):
    rows.clear()
    rs.append(evaluation.evaluate(mlp, params, source, idx, buckets=k, **kw))
    assert set(rows) == ({16} if k == 1 else {16, 8}), rows
  assert rs[1].batch_sizes == [16, 8]
  for a, b in zip(rs[0].robust["s"], rs[1].robust["s"]):
    assert a.broken_by == b.broken_by and a.robust_accuracy == b.robust_accuracy
  # A real cascade: the attacks break some of the 7 points and not others.
  assert 0 < rs[0].robust["s"][0].robust_accuracy < rs[0].clean_accuracy


def test_bucket_sizes_halve_while_the_devices_divide_them():
  assert evaluation.bucket_sizes(64, 1, 3) == [64, 32, 16]
  assert evaluation.bucket_sizes(64, 1, 9) == [64, 32, 16, 8]   # >= 8 rows per device
  assert evaluation.bucket_sizes(128, 8, 5) == [128, 64]
  assert evaluation.bucket_sizes(48, 2, 4) == [48, 24]          # 12: 6 rows per device
  assert evaluation.bucket_sizes(16, 1, 1) == [16]
  assert evaluation.bucket_sizes(8, 1, 2) == [8]


_CACHE_RUN = textwrap.dedent("""
    import json, sys
    from prsl_jax import compilation, evaluation
    from tests import test_evaluation as t  # PYTHONPATH: the repository root
    if sys.argv[2] == "on":
      compilation.enable_cache(sys.argv[3])
    params = t._linear_params()
    source, idx = t._problem(t.linear, params)
    r = evaluation.evaluate(t.linear, params, source, idx, eps_list=[2 / 255],
                            suites={"s": evaluation.make_suite(["pgd-ce"], steps=2)},
                            batch_size=16, progress_bar=False)
    print("RESULT" + json.dumps(r.timing))
""")


@pytest.mark.heavy(20)
def test_persistent_cache_serves_a_second_process_and_can_be_off(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  cache = tmp_path / "cache"
  def run(mode):
    proc = subprocess.run([sys.executable, "-c", _CACHE_RUN, os.path.dirname(__file__), mode,
                           str(cache)], capture_output=True, text=True, timeout=300,
                          env=processes.env(pythonpath=[_ROOT]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])
  first = run("on")
  assert first["cache_hits"] == 0 and first["compiles"] >= 3 and any(cache.iterdir())
  second = run("on")
  assert second["cache_hits"] == second["compiles"] == first["compiles"]
  off = run("off")
  assert off["cache_hits"] == 0 and off["compiles"] == first["compiles"]


def test_paper_suite_is_a_sign_step_along_the_training_loss_on_the_points_still_robust():
  # The paper's protocol through evaluate(): BIM through the model's own training
  # loss (here the authors' PRSL), labels = the clean predictions, so the batch's
  # PRSL group is the points still robust (clean mistakes are left out). On a
  # linear model one step of size eps is x + eps sign(dL/dx), dL/dz by hand.
  start, end, a_w, b_w, eps = 0, 3, 1.0, 0.5, 0.03
  params = _linear_params()
  source, idx = _problem(linear, params)
  x, y = source.images.astype(np.float64), source.labels
  w = np.asarray(params["w"], np.float64)
  z = x.reshape(N, -1) @ w
  ok = z.argmax(-1) == y

  def robust_after_hand_step(b):
    zz, yy = z[ok], y[ok]
    n = len(yy)
    p = np.exp(zz - zz.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dz = a_w * (p - np.eye(C)[yy]) / n
    if b:
      wins = [sorted((j for j in range(C) if j != yy[i]), key=lambda j: -zz[i, j])[start:end]
              for i in range(n)]
      m = np.array([zz[i, win].mean() for i, win in enumerate(wins)])
      sm = np.exp(m - m.max())
      sm /= sm.sum()
      for i, win in enumerate(wins):
        dz[i, win] += b * (n * sm[i] - 1) / (end - start)
    adv = np.clip(x[ok] + eps * np.sign((dz @ w.T).reshape(-1, S, S, 3)), 0, 1)
    robust = np.zeros(N, bool)
    robust[ok] = (adv.reshape(n, -1) @ w).argmax(-1) == yy
    return robust

  want = robust_after_hand_step(b_w)
  assert 0 < want.sum() < ok.sum()
  assert (want != robust_after_hand_step(0.0)).sum() >= 3  # PRSL's step is not CE's
  suite = evaluation.make_suite(
      "paper", steps=1, train_loss=("prsl", dict(start=start, end=end, weight=b_w,
                                                 ce_weight=a_w)))
  assert [a.name for a in suite] == ["bim"] and suite[0].loss is not None
  r = evaluation.evaluate(linear, params, source, idx, eps_list=[eps], suites={"paper": suite},
                          batch_size=N, progress_bar=False)
  got = np.array([m for m in r.robust["paper"][0].robust_mask], bool)
  np.testing.assert_array_equal(got, want)


def test_an_attack_added_by_one_record_runs_in_a_suite(lin, monkeypatch):
  """A new attack is its function plus one AttackRecord: suites, the cascade, the
  eps = 0 check and the keys all take it from the registry."""
  params, source, idx = lin

  def sign_noise(attack, fn, x, y, call):
    del attack, fn, y  # random corners of the L-inf ball, one per example key
    noise = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:]))(call.keys)
    return jnp.clip(x + call.eps * jnp.sign(noise), 0, 1)

  monkeypatch.setitem(evaluation.ATTACKS, "toy", attacks.AttackRecord(sign_noise))
  eps, seed = 24 / 255, 3
  r = _evaluate(linear, params, source, idx, eps_list=[eps], suite="toy", seed=seed,
                **dict(FAST, batch_size=8))
  assert r["suite"] == ["toy"] and r["checks"]["passed"], r["checks"]
  assert r["checks"]["eps0"]["toy"]["max_distance"] == 0.0
  # The same images, drawn here from the documented keys, predict what the cascade saw.
  x = np.stack([source[int(i)]["image"] for i in idx])
  y = np.asarray([source[int(i)]["label"] for i in idx])
  base = evaluation.attack_key(seed, eps, "toy")
  noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), x.shape[1:]))(
      jnp.asarray(idx, jnp.int32))
  adv = np.asarray(jnp.clip(x + eps * jnp.sign(noise), 0, 1))
  clean_ok = np.asarray(jnp.argmax(linear(params, x), -1)) == y
  adv_ok = np.asarray(jnp.argmax(linear(params, adv), -1)) == y
  e = r["robust"][0]
  assert e["robust_mask"] == (clean_ok & adv_ok).tolist()
  assert 0 < e["broken"]["toy"] == int(np.sum(clean_ok & ~adv_ok))


def test_split_rest_pads_less_than_the_smallest_batch():
  sizes = evaluation.bucket_sizes(128, 1, None)
  assert sizes == [128, 64, 32, 16, 8]
  assert evaluation.split_rest(113, sizes) == [64, 32, 16, 8]  # 120 rows, not 128
  assert evaluation.split_rest(125, sizes) == [128]            # 3 padding rows
  assert evaluation.split_rest(5, sizes) == [8]
  assert evaluation.split_rest(0, sizes) == []
  assert evaluation.split_rest(113, [128]) == [128]
  for rest in range(1, 128):
    parts = evaluation.split_rest(rest, sizes)
    assert rest <= sum(parts) < rest + 8 and len(parts) <= len(sizes)


@pytest.mark.heavy(60)
def test_outcomes_do_not_depend_on_the_batch_size(tiny_clip):
  # PMG-AFT's robust accuracy grew with the test batch size: here each example's
  # outcome (which attack broke it, if any) is the same at 8 and 64 rows a
  # batch (20 points: 3 batches against 1 padded one), for the fast and the
  # standard suite. (Mixed bucket shapes: test_smaller_batches_... above.)
  from prsl_jax import data, zeroshot  # pylint: disable=g-import-not-at-top
  model, params, tokenizer = tiny_clip
  digits, names = data.load("digits", "test", image_size=model.image_size)
  x = np.stack([digits[i]["image"] for i in range(20)])
  variables = {"params": params,
               "class_emb": zeroshot.class_embeddings(model, params, tokenizer, names)}
  y = np.array(jnp.argmax(zeroshot.Classifier(model)(variables, x), -1), np.int32)
  y[:2] = (y[:2] + 1) % len(names)  # two clean mistakes
  source = ArraySource(x, y)
  kw = dict(steps=3, queries=12, num_targets=3)
  suites = {"fast": evaluation.make_suite("fast", **kw),
            "standard": evaluation.make_suite("standard", **kw)}
  runs = [evaluation.evaluate(zeroshot.Classifier(model), variables, source, np.arange(20),
                              eps_list=[1 / 255, 4 / 255], suites=suites, batch_size=bs,
                              buckets=1, progress_bar=False) for bs in (8, 64)]
  assert runs[0].batch_sizes == [8] and runs[1].batch_sizes == [64]
  for name in suites:
    for a, b in zip(runs[0].robust[name], runs[1].robust[name]):
      assert a.broken_by == b.broken_by and a.robust_mask == b.robust_mask
  # The cascades did something: points broken at 4/255, by more than one attack.
  broken = [r.broken_by for r in runs[0].robust["standard"]][-1]
  assert runs[0].clean_accuracy == 0.9 and sum(b not in (None, "clean") for b in broken) >= 2


def linear_padded(params, images):
  # linear's 10 classes in 16 columns, the 6 padded ones masked as
  # zeroshot.Classifier masks them (class_mask).
  z = jnp.pad(linear(params, images), ((0, 0), (0, 6)))
  return jnp.where(jnp.arange(16) < C, z, jnp.float32(-1e9))


def test_padded_classes_change_no_outcome(lin):
  # Datasets of different class counts share compiled attacks by padding the
  # logits: argmax, CE, DLR's sorted logits and APGD-T's 9 targets (all C - 1
  # real wrong classes) must never see the padded ones.
  params, source, idx = lin
  suites = {"s": evaluation.make_suite("standard", steps=3, queries=12)}
  kw = dict(eps_list=[0.5 / 255, 2 / 255], suites=suites, batch_size=16, progress_bar=False)
  plain = evaluation.evaluate(linear, params, source, idx, **kw)
  padded = evaluation.evaluate(linear_padded, params, source, idx, num_classes=C, **kw)
  assert padded.checks.passed and padded.clean_accuracy == plain.clean_accuracy
  for a, b in zip(plain.robust["s"], padded.robust["s"]):
    assert a.broken_by == b.broken_by and a.accuracy_after == b.accuracy_after
  # A real cascade: points APGD-CE broke, and points left to APGD-T's targets.
  first = plain.robust["s"][0]
  assert 0 < first.accuracy_after["apgd-ce"] < plain.clean_accuracy, first.accuracy_after
