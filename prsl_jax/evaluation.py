"""Robustness evaluation with AutoAttack's protocol, in JAX, and reports.

    results = evaluate(logits_fn, params, source, indices, eps_list=[4 / 255])
    print(format_table({"my model": results}))

Protocol (Croce & Hein 2020): the attacks of a suite run as a cascade. Each
attack runs only on the points that every earlier attack failed on, so a point
counts as robust only if it survived all of them: robust accuracy is the worst
case over the ensemble, per example, never an average over attacks. Points
misclassified when clean are never attacked and count as not robust.

Reproducibility: the PRNG key of example i under attack a at budget eps is
fold_in(fold_in(fold_in(key(seed), bits(eps)), crc32(a)), i), with i the
example's index in the source. So an example's random draws depend on neither
the batch it sits in, the batch size, the device count, the other budgets
evaluated nor the order of the suite; one attack alone and the same attack
inside a cascade make the same draws for the same point.

Soundness checks (results["checks"]; each failure also raises a
SoundnessWarning): logits deterministic across two separately traced calls;
logits that are not probabilities; input gradients of the cross-entropy finite
and non-zero at every clean point; every returned adversarial image inside its
ball and in [0, 1] (an image outside never counts as a success); each attack at
eps = 0 returning the clean images and predictions; and a black-box attack
breaking points that all the white-box attacks before it failed on, the mark of
masked gradients (GradientMaskingWarning).
"""

import functools
import time
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from prsl_jax import attacks
from prsl_jax import data as data_lib


DATA = "data"  # the mesh axis batches are split over (prsl_jax.sharding.DATA)


class SoundnessWarning(UserWarning):
  """An evaluation check failed: the robust accuracy may not be trustworthy."""


class GradientMaskingWarning(SoundnessWarning):
  """A black-box attack beat the white-box ones: gradients are likely masked."""


# ----------------------------------------------------------------------------
# Attacks as plain data: name -> fn(logits_fn, x, y, keys, eps, *, norm, steps,
# queries) -> x_adv. `steps`/`queries` are None for the attack's default.
# ----------------------------------------------------------------------------

DEFAULT_STEPS = 100  # APGD, APGD-T (per target) and PGD iterations (AutoAttack: 100)
DEFAULT_QUERIES = 5000  # Square (AutoAttack: 5000)
APGD_TARGETS = 9  # AutoAttack's standard version; capped at C - 1


def _apgd(loss):
  def run(fn, x, y, keys, eps, *, norm, steps, queries):
    del queries
    return attacks.apgd(fn, x, y, key=keys, eps=eps, steps=steps or DEFAULT_STEPS,
                        norm=norm, loss=loss)
  return run


def _apgd_t(fn, x, y, keys, eps, *, norm, steps, queries):
  del queries
  return attacks.apgd_targeted(fn, x, y, key=keys, eps=eps, steps=steps or DEFAULT_STEPS,
                               norm=norm, num_targets=APGD_TARGETS)


def _square(fn, x, y, keys, eps, *, norm, steps, queries):
  del steps
  return attacks.square(fn, x, y, key=keys, eps=eps, queries=queries or DEFAULT_QUERIES,
                        norm=norm)


def _pgd(loss):
  def run(fn, x, y, keys, eps, *, norm, steps, queries):
    del queries
    return attacks.pgd(fn, x, y, key=keys, eps=eps, steps=steps or DEFAULT_STEPS,
                       norm=norm, loss=loss)
  return run


def _fgsm(fn, x, y, keys, eps, *, norm, steps, queries):
  del keys, norm, steps, queries  # deterministic, L-inf only (checked up front)
  return attacks.fgsm(fn, x, y, eps=eps)


ATTACKS = {
    "apgd-ce": _apgd("ce"),
    "apgd-dlr": _apgd("dlr"),
    "apgd-t": _apgd_t,
    "square": _square,
    "pgd-ce": _pgd("ce"),
    "pgd-cw": _pgd("cw"),
    "fgsm": _fgsm,
}
# Score-based attacks: they never see a gradient, so masking cannot fool them.
BLACK_BOX = frozenset({"square"})
LINF_ONLY = frozenset({"fgsm"})

SUITES = {
    "standard": ["apgd-ce", "apgd-t", "square"],  # AutoAttack's standard version, sans FAB-T
    "fast": ["apgd-ce", "apgd-t"],
    "pgd": ["pgd-ce", "pgd-cw"],
}

# A black-box attack may break at most this fraction of the points before the
# masking flag is raised (AutoAttack's checks.py uses the same 0.2%).
MASKING_TOL = 0.002


def resolve_suite(suite, norm="linf"):
  """Suite name, attack name or list of attack names -> attack names; errors up front."""
  if isinstance(suite, str) and suite in ATTACKS and suite not in SUITES:
    suite = [suite]  # one attack by name
  if isinstance(suite, str):
    if suite not in SUITES:
      raise ValueError(f"unknown suite {suite!r}; choose one of {sorted(SUITES)} or pass "
                       f"a list of attacks from {sorted(ATTACKS)}")
    names = list(SUITES[suite])
  else:
    names = list(suite)
  if not names:
    raise ValueError("the attack suite is empty")
  unknown = [n for n in names if n not in ATTACKS]
  if unknown:
    raise ValueError(f"unknown attack(s) {unknown}; choose from {sorted(ATTACKS)}")
  if len(set(names)) != len(names):
    raise ValueError(f"attack suite {names} names an attack twice")
  if norm not in attacks.NORMS:
    raise ValueError(f"unknown norm {norm!r}; choose one of {list(attacks.NORMS)}")
  if norm != "linf" and LINF_ONLY & set(names):
    raise ValueError(f"{sorted(LINF_ONLY & set(names))} support norm='linf' only")
  return names


def check_eps_list(eps_list):
  """Budgets -> list of float; finite, >= 0, at least one."""
  eps = [float(e) for e in np.atleast_1d(np.asarray(eps_list, dtype=np.float64))]
  if not eps:
    raise ValueError("eps_list is empty")
  bad = [e for e in eps if not np.isfinite(e) or e < 0]
  if bad:
    raise ValueError(f"every eps must be a finite number >= 0, got {bad}")
  return eps


# ----------------------------------------------------------------------------
# Per-batch functions, jitted once per shape, sharded over 'data' with a mesh.
# ----------------------------------------------------------------------------


def _shard(fn, mesh, in_specs):
  """jit(fn), or fn per shard of the mesh with its outputs gathered on every device.

  Gathered (replicated) outputs are readable by every process of a multi-host
  run; they are a few numbers per example, so the gather costs nothing.
  """
  if mesh is None:
    return jax.jit(fn)
  def per_shard(*args):
    return tuple(jax.lax.all_gather(o, DATA, tiled=True) for o in fn(*args))
  # check_vma=False: the attacks' loop carries start from the replicated eps yet
  # vary per shard, which the varying-axes type check rejects; the only
  # collective is the final gather.
  return jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=in_specs, out_specs=P(),
                               check_vma=False))


def _to_mesh(mesh, batch_spec, *arrays):
  """Host arrays (the full batch, on every process) -> global arrays on the mesh."""
  if mesh is None:
    return arrays
  sharding = NamedSharding(mesh, batch_spec)
  return tuple(jax.make_array_from_callback(x.shape, sharding, lambda i, x=x: x[i])
               for x in map(np.asarray, arrays))


# Cached so that evaluating several budgets, seeds or suites with the same
# logits_fn compiles each function once; small, since entries hold logits_fn.
_cache = functools.lru_cache(maxsize=16)


@_cache
def _clean_fn(logits_fn, mesh):
  """(params, x, y) -> logits (B, C), max |grad CE| (B,), grad finite (B,)."""
  def run(params, x, y):
    def loss(x):
      logits = logits_fn(params, x).astype(jnp.float32)
      return jnp.sum(attacks.ce_objective(logits, y)), logits
    (_, logits), grad = jax.value_and_grad(loss, has_aux=True)(x)
    grad = grad.astype(jnp.float32).reshape(x.shape[0], -1)
    return logits, jnp.max(jnp.abs(grad), axis=1), jnp.all(jnp.isfinite(grad), axis=1)
  return _shard(run, mesh, (P(), P(DATA), P(DATA)))


@_cache
def _logits_fn(logits_fn, mesh):
  return _shard(lambda params, x: (logits_fn(params, x).astype(jnp.float32),), mesh,
                (P(), P(DATA)))


@_cache
def _attack_fn(name, logits_fn, *, norm, steps, queries, mesh):
  """(params, x, y, keys, eps) -> (logits of x_adv (B, C), distance (B,), in [0, 1] (B,)).

  The checks of the returned images run here, on the device, so the images
  themselves never travel to the host.
  """
  attack = ATTACKS[name]
  def run(params, x, y, keys, eps):
    fn = functools.partial(logits_fn, params)
    x_adv = attack(fn, x, y, keys, eps, norm=norm, steps=steps, queries=queries)
    delta = (x_adv.astype(jnp.float32) - x.astype(jnp.float32)).reshape(x.shape[0], -1)
    dist = (jnp.max(jnp.abs(delta), axis=1) if norm == "linf"
            else jnp.sqrt(jnp.sum(delta * delta, axis=1)))
    flat = x_adv.reshape(x.shape[0], -1)
    in_range = (jnp.all(jnp.isfinite(flat), axis=1) & (jnp.min(flat, axis=1) >= 0)
                & (jnp.max(flat, axis=1) <= 1))
    return fn(x_adv).astype(jnp.float32), dist, in_range
  return _shard(run, mesh, (P(), P(DATA), P(DATA), P(DATA), P()))


def _ball_tol(eps, norm, numel):
  # float32 rounding of x0 + delta: a few ulps per pixel; for L2 they add up.
  return 1e-6 if norm == "linf" else 1e-5 * eps + 1e-6 * np.sqrt(numel)


def _keys(seed, eps, name, example_ids):
  """Per-example raw keys (B, 2) uint32: see the module docstring."""
  key = jax.random.key(seed)
  key = jax.random.fold_in(key, int(np.float32(eps).view(np.uint32)))
  key = jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
  # Raw key data, so that it shards like any array (attacks take (B, 2) uint32).
  return np.asarray(jax.random.key_data(jax.vmap(lambda i: jax.random.fold_in(key, i))(
      jnp.asarray(example_ids, dtype=jnp.uint32))))


def _batches(source, indices, positions, batch_size):
  """eval_batches over source[indices[positions]], with the positions of each row."""
  ids = np.asarray(indices)[positions]
  for start, batch in zip(range(0, len(ids), batch_size),
                          data_lib.eval_batches(source, ids, batch_size)):
    pos = positions[start:start + batch_size]
    rows = np.concatenate([pos, np.repeat(pos[-1:], batch_size - len(pos))])
    yield batch, rows, np.asarray(indices)[rows]


def _warn(checks, message, category=SoundnessWarning):
  checks["warnings"].append(message)
  warnings.warn(message, category, stacklevel=3)


# ----------------------------------------------------------------------------
# The evaluation.
# ----------------------------------------------------------------------------


def evaluate(logits_fn, params, source, indices, *, eps_list, suite="standard",
             norm="linf", seed=0, batch_size=64, mesh=None, steps=None,
             square_queries=None, masking_tol=MASKING_TOL, progress=True):
  """Clean and robust accuracy of a classifier under an attack cascade.

  Args:
    logits_fn: pure fn(params, images (B, H, W, C') float32 in [0, 1]) -> (B, C).
    params: pytree passed to logits_fn (replicated over the mesh).
    source: random-access source of dicts with 'image' and 'label' (prsl_jax.data).
    indices: int array, the examples of `source` to evaluate (N of them).
    eps_list: budgets in [0, 1] pixel units (L-inf per pixel, L2 per image).
    suite: a name in SUITES or a list of names in ATTACKS, run in that order.
    norm: 'linf' or 'l2'.
    seed: PRNG seed of the attacks (see the module docstring).
    batch_size: rows per attack call, fixed (the last batch is padded) so each
      attack compiles once; must divide by the number of devices of `mesh`.
    mesh: jax.sharding.Mesh with axis 'data', or None for one device.
    steps: iterations of APGD, APGD-T (per target) and PGD; None: 100.
    square_queries: Square's queries per point; None: 5000.
    masking_tol: fraction of points a black-box attack may break, after the
      white-box ones failed on them, before the masking flag is raised.
    progress: show a tqdm bar with the running robust accuracy.

  Returns:
    dict (JSON-serialisable):
      num_examples, indices, suite, norm, seed, batch_size, num_devices, steps,
        square_queries,
      clean_accuracy: float in [0, 1],
      robust: list, one dict per eps, in eps_list order:
        eps,
        robust_accuracy: the ensemble's, worst case per example;
        accuracy_after: {attack: accuracy after that attack of the cascade},
          i.e. cumulative over it and the attacks before it (the last one
          equals robust_accuracy; the first one is that attack alone);
        broken: {attack: points it was first to break},
        robust_mask: per example (in `indices` order), robust or not,
        broken_by: per example, the attack that broke it, 'clean' if
          misclassified to begin with, None if robust,
        outside_ball: adversarial images outside the ball or [0, 1] (not counted),
        max_ball_excess: max over points of distance - eps (<= tolerance is ok),
        gradient_masking: bool, masking_fraction: float, seconds: float,
      checks: dict: deterministic, logits_max_abs_diff, outputs_are_logits,
        gradients_ok, zero_gradient_fraction, nonfinite_gradient_fraction,
        ball_ok, eps0_ok, eps0 ({attack: {max_distance, prediction_agreement}}),
        gradient_masking, passed, warnings (list of str).
  """
  names = resolve_suite(suite, norm)
  eps_list = check_eps_list(eps_list)
  indices = np.asarray(indices, dtype=np.int64)
  if indices.ndim != 1 or not len(indices):
    raise ValueError(f"indices must be a non-empty 1-D array, got shape {indices.shape}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  num_devices = 1
  if mesh is not None:
    if DATA not in mesh.axis_names:
      raise ValueError(f"mesh must have a 'data' axis, got axes {mesh.axis_names}")
    num_devices = mesh.shape[DATA]
    if batch_size % num_devices:
      raise ValueError(f"batch_size={batch_size} must be divisible by the number of "
                       f"devices on the mesh's 'data' axis ({num_devices})")
  for name, value in (("steps", steps), ("square_queries", square_queries)):
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
      raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
  if mesh is not None:
    # Replicated on every device (a multi-host run needs global arrays).
    params = jax.device_put(params, NamedSharding(mesh, P()))
  n = len(indices)
  checks = {"warnings": []}

  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm.tqdm(total=-(-n // batch_size), disable=not progress, desc="clean",
                  dynamic_ncols=True)

  # --- Clean pass: predictions, gradients at the start points. ---
  clean = _clean_fn(logits_fn, mesh)
  correct = np.zeros(n, bool)
  clean_pred = np.zeros(n, np.int64)
  zero_grad = nonfinite_grad = 0
  first = None
  seen = 0
  for batch, rows, _ in _batches(source, indices, np.arange(n), batch_size):
    logits, gmax, gfinite = jax.device_get(
        clean(params, *_to_mesh(mesh, P(DATA), batch["image"], batch["label"])))
    valid = batch["mask"]
    pred = np.argmax(logits, axis=-1)
    correct[rows[valid]] = (pred == batch["label"])[valid]
    clean_pred[rows[valid]] = pred[valid]
    zero_grad += int(np.sum((gmax == 0) & gfinite & valid))
    nonfinite_grad += int(np.sum(~gfinite & valid))
    if first is None:
      first = (batch, rows, logits)
    seen += int(valid.sum())
    bar.update()
    bar.set_postfix(clean_acc=f"{correct.sum() / seen:.3f}")  # over the rows seen so far
  clean_acc = float(correct.mean())

  # --- Checks on the first batch: determinism, logits vs probabilities. ---
  batch0, rows0, logits0 = first
  valid0 = batch0["mask"]
  (again,) = jax.device_get(
      _logits_fn(logits_fn, mesh)(params, *_to_mesh(mesh, P(DATA), batch0["image"])))
  diff = float(np.max(np.abs(again - logits0)[valid0])) if valid0.any() else 0.0
  scale = float(np.max(np.abs(logits0[valid0]))) if valid0.any() else 1.0
  checks["deterministic"] = bool(np.isfinite(diff) and diff <= 1e-4 * max(1.0, scale))
  checks["logits_max_abs_diff"] = diff
  if not checks["deterministic"]:
    _warn(checks, f"logits_fn is not deterministic: two calls on the same images differ "
          f"by up to {diff:.3g}. Randomised models need EOT attacks; these numbers "
          "overstate robustness.")
  rows_sum = logits0[valid0].sum(axis=-1)
  probs = bool(logits0[valid0].min() >= 0 and logits0[valid0].max() <= 1
               and np.allclose(rows_sum, 1.0, atol=1e-4))
  checks["outputs_are_logits"] = not probs
  if probs:
    _warn(checks, "logits_fn seems to return probabilities (rows in [0, 1] summing to "
          "1); the attack losses expect logits, and a softmax before them can mask "
          "gradients")
  checks["zero_gradient_fraction"] = zero_grad / n
  checks["nonfinite_gradient_fraction"] = nonfinite_grad / n
  checks["gradients_ok"] = zero_grad == 0 and nonfinite_grad == 0
  if not checks["gradients_ok"]:
    _warn(checks, f"input gradients of the cross-entropy at the clean points: "
          f"{zero_grad} of {n} are all zero and {nonfinite_grad} not finite; "
          "gradient-based attacks cannot move from there (masked or saturated "
          "gradients), so their robust accuracy is an overestimate")

  run = {name: _attack_fn(name, logits_fn, norm=norm, steps=steps, queries=square_queries,
                          mesh=mesh) for name in names}
  numel = int(np.prod(batch0["image"].shape[1:]))

  # --- eps = 0 on the first batch: every attack must return the clean images. ---
  eps0 = {}
  for name in names:
    args = _to_mesh(mesh, P(DATA), batch0["image"], batch0["label"],
                    _keys(seed, 0.0, name, indices[rows0]))
    logits, dist, in_range = jax.device_get(
        run[name](params, *args, *_to_mesh(mesh, P(), np.float32(0.0))))
    agree = float(np.mean((np.argmax(logits, -1) == clean_pred[rows0])[valid0]))
    eps0[name] = {"max_distance": float(np.max(dist[valid0])),
                  "prediction_agreement": agree, "in_range": bool(in_range[valid0].all())}
  checks["eps0"] = eps0
  checks["eps0_ok"] = all(v["max_distance"] <= _ball_tol(0.0, norm, numel)
                          and v["prediction_agreement"] == 1.0 and v["in_range"]
                          for v in eps0.values())
  if not checks["eps0_ok"]:
    _warn(checks, f"at eps=0 the attacks do not reproduce the clean predictions: {eps0}")

  # --- The cascade, one budget at a time. ---
  robust_results = []
  for eps in eps_list:
    t0 = time.time()
    tol = _ball_tol(eps, norm, numel)
    robust = correct.copy()
    broken_by = np.where(correct, None, "clean").astype(object)
    after, broken = {}, {}
    outside, excess = 0, -np.inf
    white_before, masked = False, 0
    for name in names:
      positions = np.flatnonzero(robust)
      broken[name] = 0
      bar.reset(total=-(-len(positions) // batch_size))
      bar.set_description(f"eps={_eps_str(eps)} {name}")
      for batch, rows, ids in _batches(source, indices, positions, batch_size):
        args = _to_mesh(mesh, P(DATA), batch["image"], batch["label"],
                        _keys(seed, eps, name, ids))
        logits, dist, in_range = jax.device_get(
            run[name](params, *args, *_to_mesh(mesh, P(), np.float32(eps))))
        valid = batch["mask"]
        ok = in_range & (dist <= eps + tol)
        outside += int(np.sum(~ok & valid))
        if valid.any():
          excess = max(excess, float(np.max(dist[valid])) - eps)
        hit = valid & ok & (np.argmax(logits, -1) != batch["label"])
        robust[rows[hit]] = False
        broken_by[rows[hit]] = name
        broken[name] += int(hit.sum())
        if name in BLACK_BOX and white_before:
          masked += int(hit.sum())
        bar.update()
        bar.set_postfix(robust_acc=f"{robust.sum() / n:.3f}")
      after[name] = float(robust.mean())
      white_before |= name not in BLACK_BOX
    masking = masked / n > masking_tol
    if outside:
      _warn(checks, f"eps={eps:.6g}: {outside} adversarial images were outside the "
            f"{norm} ball or [0, 1] (by up to {excess:.3g}); they were not counted")
    if masking:
      _warn(checks, f"eps={eps:.6g}: gradient masking suspected: the black-box attack(s) "
            f"{sorted(BLACK_BOX & set(names))} broke {masked} of {n} points on which every "
            "white-box attack before them failed", GradientMaskingWarning)
    robust_results.append({
        "eps": eps,
        "robust_accuracy": float(robust.mean()),
        "accuracy_after": after,
        "broken": broken,
        "robust_mask": robust.tolist(),
        "broken_by": broken_by.tolist(),
        "outside_ball": outside,
        "max_ball_excess": excess if np.isfinite(excess) else None,
        "gradient_masking": masking,
        "masking_fraction": masked / n,
        "seconds": time.time() - t0,
    })
  bar.close()

  checks["ball_ok"] = all(r["outside_ball"] == 0 for r in robust_results)
  checks["gradient_masking"] = any(r["gradient_masking"] for r in robust_results)
  checks["passed"] = bool(checks["deterministic"] and checks["outputs_are_logits"]
                          and checks["gradients_ok"] and checks["ball_ok"]
                          and checks["eps0_ok"] and not checks["gradient_masking"])
  return {
      "num_examples": n,
      "indices": indices.tolist(),
      "suite": names,
      "norm": norm,
      "seed": seed,
      "batch_size": batch_size,
      "num_devices": num_devices,
      "steps": steps or DEFAULT_STEPS,
      "square_queries": square_queries or DEFAULT_QUERIES,
      "clean_accuracy": clean_acc,
      "robust": robust_results,
      "checks": checks,
  }


# ----------------------------------------------------------------------------
# Reports.
# ----------------------------------------------------------------------------


def _eps_str(eps):
  """4/255 for multiples of 1/255, else the number."""
  k = eps * 255
  if eps and abs(k - round(k)) < 1e-6:
    return f"{round(k)}/255"
  return f"{eps:g}"


def _pct(x):
  return "–" if x is None else f"{100 * x:.1f}"


def _failed_checks(results):
  c = results.get("checks", {})
  names = [("deterministic", "nondeterministic"), ("outputs_are_logits", "probabilities"),
           ("gradients_ok", "gradients"), ("ball_ok", "ball"), ("eps0_ok", "eps=0")]
  failed = [label for key, label in names if not c.get(key, True)]
  if c.get("gradient_masking"):
    failed.append("MASKING")
  return failed


def format_table(results_by_model):
  """Markdown: accuracy (%) per model, clean and robust per eps, then per attack.

  The first table has the ensemble's robust accuracy; the second the accuracy
  after each attack of the cascade (cumulative: that attack and all before it).
  """
  eps_all = sorted({r["eps"] for res in results_by_model.values() for r in res["robust"]})
  head = ["model", "clean"] + [f"ε={_eps_str(e)}" for e in eps_all] + ["checks"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for model, res in results_by_model.items():
    by_eps = {r["eps"]: r for r in res["robust"]}
    cells = [model, _pct(res["clean_accuracy"])]
    cells += [_pct(by_eps[e]["robust_accuracy"]) if e in by_eps else "–" for e in eps_all]
    cells.append(", ".join(_failed_checks(res)) or "ok")
    lines.append("| " + " | ".join(cells) + " |")
  first = next(iter(results_by_model.values()), None)
  if first is not None:
    lines += ["", f"Robust accuracy (%) after each attack of the cascade "
              f"({first['norm']}; cumulative: an attack runs only on the points the "
              "attacks before it failed on).", ""]
    attack_names = []
    for res in results_by_model.values():
      attack_names += [a for a in res["suite"] if a not in attack_names]
    head = ["model", "eps"] + attack_names
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, res in results_by_model.items():
      for r in res["robust"]:
        cells = [model, _eps_str(r["eps"])]
        cells += [_pct(r["accuracy_after"].get(a)) for a in attack_names]
        lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(results_by_model, path):
  """PNG of robust accuracy (%) against eps, one line per model (eps=0: clean)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  all_eps = [r["eps"] for res in results_by_model.values() for r in res["robust"]]
  norms = {res["norm"] for res in results_by_model.values()}
  # In 1/255 units when every budget is a multiple of it (the usual L-inf budgets).
  in_255 = all(abs(e * 255 - round(e * 255)) < 1e-6 for e in all_eps)
  unit = 255.0 if in_255 else 1.0
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for model, res in results_by_model.items():
    pts = sorted((r["eps"], r["robust_accuracy"]) for r in res["robust"])
    if not pts or pts[0][0] > 0:
      pts = [(0.0, res["clean_accuracy"])] + pts
    ax.plot([e * unit for e, _ in pts], [100 * a for _, a in pts], marker="o", label=model)
  ax.set_xlabel(("ε (× 1/255)" if in_255 else "ε") + f", {'/'.join(sorted(norms))}")
  ax.set_ylabel("robust accuracy (%)")
  suites = {" + ".join(res["suite"]) for res in results_by_model.values()}
  ax.set_title("; ".join(sorted(suites)), fontsize=9)
  ax.set_ylim(0, 100)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
