"""Robustness evaluation with AutoAttack's protocol, in JAX.

    suites = {"standard": make_suite("standard"), "paper": make_suite("paper")}
    result = evaluate(Classifier(model), variables, source, indices,
                      eps_list=[4 / 255], suites=suites)
    print(reports.format_table({"my model": result}))

Protocol (Croce & Hein 2020): the attacks of a suite run as a cascade. Each
attack runs only on the points that every earlier attack failed on, so a point
counts as robust only if it survived all of them: robust accuracy is the worst
case over the ensemble, per example, never an average over attacks. Points
misclassified when clean are never attacked and count as not robust. Several
suites (the standard cascade, PGD-CE alone, the paper's BIM) are separate
cascades over the same clean pass and checks, reported side by side.

The parts, each a function: `clean_pass` (predictions, input gradients),
`soundness_checks` (determinism, logits not probabilities, gradients),
`eps0_check` (every attack at eps = 0 returns the clean images), and `cascade`
(one suite at one budget). `evaluate` runs them and returns a typed `Result`.

The skeleton every task's evaluation shares (captioners too, prsl_jax.captioning):
`prepare` (budgets, indices, batch size, mesh), `batches` (fixed-size padded
batches on the mesh), `sharded` (a per-batch function over the mesh),
`perturbation` and `in_ball` (the ball checks), `attack_key` (per-example keys),
`warn` (a failed check), and `skeleton(Parts(...))`, which runs a task's clean
pass, soundness checks, eps = 0 check and cascades in that order and times them.

Compilation. The model under attack is a value-hashable callable of
(variables, images) (e.g. zeroshot.Classifier(model)): the jitted batch
functions below take it, the attack's settings and the mesh as static
arguments and everything else (variables, images, eps, keys) as arrays. So every
checkpoint of one architecture, every budget (eps is traced) and the eps = 0
check share one compilation per attack and batch size (`bucket_sizes`: the
batch size and its half), and no cache keeps params alive.

Reproducibility: the PRNG key of example i under attack a at budget eps is
fold_in(fold_in(fold_in(key(seed), bits(eps)), crc32(a)), i), with i the
example's index in the source. So an example's random draws depend on neither
the batch it sits in, the batch size, the device count, the other budgets
evaluated nor the order of the suite.

Soundness checks (Result.checks; each failure also raises a SoundnessWarning):
logits deterministic across two separately traced calls; logits that are not
probabilities; input gradients of the cross-entropy finite and non-zero at every
clean point; every returned adversarial image inside its ball and in [0, 1] (an
image outside never counts as a success); each attack at eps = 0 returning the
clean images and predictions; and a black-box attack breaking points that all
the white-box attacks before it failed on, the mark of masked gradients
(GradientMaskingWarning).
"""

import dataclasses
import functools
import time
import warnings
import zlib
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from prsl_jax import attacks
from prsl_jax import compilation
from prsl_jax import losses
from prsl_jax import progress
from prsl_jax import sharding

DATA = sharding.DATA


class SoundnessWarning(UserWarning):
  """An evaluation check failed: the robust accuracy may not be trustworthy."""


class GradientMaskingWarning(SoundnessWarning):
  """A black-box attack beat the white-box ones: gradients are likely masked."""


# ----------------------------------------------------------------------------
# Attacks with their settings, as plain data.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Attack:
  """One attack of a suite and its settings; hashable, so a jit static.

  name: a key of ATTACKS. steps: iterations (APGD, per APGD-T/FAB-T target,
  PGD, BIM). queries: Square's. num_targets: APGD-T's and FAB-T's targets
  (capped at C-1). restarts: random restarts (APGD, PGD, FAB-T). step_size:
  PGD's step (pixel units; None: 2.5 eps / steps). loss: the
  objective of 'bim', the model's own training loss: None (cross-entropy) or
  (name, ((arg, value), ...)) for losses.get_loss.
  """
  name: str
  steps: int = 100
  queries: int = 5000
  num_targets: int = 9
  restarts: int = 1
  loss: Optional[tuple] = None
  step_size: Optional[float] = None  # PGD's, in pixel units (None: 2.5 eps / steps)

  def objective(self, axis_name=None):
    """The objective for attacks' `loss`: 'ce' or a batch loss over `axis_name`."""
    if self.loss is None:
      return "ce"
    fn = losses.get_loss(self.loss[0], **dict(self.loss[1]))
    return lambda logits, labels: fn(logits, labels, axis_name=axis_name)


# The registry of attacks (prsl_jax/attacks/registry.py): one record each.
ATTACKS = attacks.ATTACKS

SUITES = {
    # AutoAttack's standard version: APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square.
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "fast": ("apgd-ce", "apgd-t"),
    "pgd": ("pgd-ce", "pgd-cw"),
    # arXiv:2402.03627's attack: 10 sign steps through the model's own training loss.
    "paper": ("bim",),
}

# A black-box attack may break at most this fraction of the points before the
# masking flag is raised (AutoAttack's checks.py uses the same 0.2%).
MASKING_TOL = 0.002


def suite_spec(spec: str):
  """One --suite / config.eval.suites entry -> make_suite's `suite`: 'a, b' ->
  ['a', 'b'] (a list of attacks), else the stripped name (a suite or an attack)."""
  if "," in spec:
    return [s.strip() for s in spec.split(",") if s.strip()]
  return spec.strip()


def make_suite(suite, norm="linf", *, steps=None, queries=None, num_targets=None,
               restarts=None, train_loss=None, settings=None):
  """A suite name, an attack name or a list of names -> tuple of Attack.

  Args:
    suite: a key of SUITES, a key of ATTACKS, or a sequence of ATTACKS keys.
    norm: 'linf' or 'l2' (FGSM and BIM are L-inf only).
    steps, queries, num_targets, restarts: overrides for every attack that
      uses them (None: AutoAttack's values; BIM: 10 steps).
    train_loss: the model's training loss for 'bim': (name, {arg: value}) as
      for losses.get_loss, or None for cross-entropy.
    settings: {attack name: {field: value}} per-attack overrides, applied last.

  Raises:
    ValueError naming an unknown suite/attack, a repeated attack, a bad
    setting or an attack that does not support `norm`.
  """
  if isinstance(suite, str) and suite in ATTACKS and suite not in SUITES:
    suite = [suite]
  if isinstance(suite, str):
    if suite not in SUITES:
      raise ValueError(f"unknown suite {suite!r}; choose one of {sorted(SUITES)} or a list "
                       f"of attacks from {sorted(ATTACKS)}")
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
  attacks.core.check_choice("norm", norm, attacks.NORMS)
  linf_only = sorted(n for n in names if ATTACKS[n].linf_only)
  if norm != "linf" and linf_only:
    raise ValueError(f"{linf_only} support norm='linf' only")
  settings = dict(settings or {})
  stray = sorted(set(settings) - set(names))
  if stray:
    raise ValueError(f"settings for {stray}, which the suite {names} does not run")
  loss = None
  if train_loss is not None:
    name, kwargs = train_loss
    losses.get_loss(name, **dict(kwargs))  # validates name and arguments now
    loss = (name, tuple(sorted(dict(kwargs).items())))
  out = []
  for name in names:
    fields = dict(steps=ATTACKS[name].default_steps if steps is None else steps)
    for field, value in (("queries", queries), ("num_targets", num_targets),
                         ("restarts", restarts)):
      if value is not None:
        fields[field] = value
    if ATTACKS[name].training_loss:
      fields["loss"] = loss
    fields.update(settings.get(name, {}))
    bad = sorted(set(fields) - {f.name for f in dataclasses.fields(Attack)})
    if bad:
      raise ValueError(f"unknown setting(s) {bad} for attack {name!r}")
    for field in ("steps", "queries", "num_targets", "restarts"):
      if field in fields:
        losses.check_int(f"{name} {field}", fields[field], minimum=1)
    out.append(Attack(name, **fields))
  return tuple(out)


# Budgets past these are outside what the field reports (TeCoA: 1/255; FARE:
# 2/255 and 4/255; RobustBench L2: 0.5 at 32x32) and get a warning.
TYPICAL_MAX = {"linf": 16 / 255, "l2": 4.0}


def warn_unusual_budget(label, eps, norm):
  """A warning when eps is far above the budgets the field reports (likely 0-255
  units); label names the budget, e.g. "--eps 8" or "config.eval.eps=8"."""
  top = TYPICAL_MAX.get(norm)
  if top is not None and eps > top:
    warnings.warn(f"{label} is far above the budgets the field reports ({norm} up to "
                  f"{format_eps(top)}); budgets are in [0, 1] pixel units")


def check_eps_list(eps_list, norm="linf"):
  """Budgets -> list of float; finite, >= 0 (and <= 1 for L-inf), at least one."""
  eps = [float(e) for e in np.atleast_1d(np.asarray(eps_list, dtype=np.float64))]
  if not eps:
    raise ValueError("eps_list is empty")
  for e in eps:
    attacks.core.check_eps(e, norm)
  return eps


# ----------------------------------------------------------------------------
# Per-batch functions: jitted once per (model fn, attack, shapes, mesh).
# ----------------------------------------------------------------------------


def sharded(fn, mesh, in_specs, *args):
  """fn(*args, axis_name), or fn per shard of the mesh with its outputs gathered on
  every device (axis_name DATA); in_specs: one PartitionSpec per argument.

  Gathered (replicated) outputs are readable by every process of a multi-host
  run; they are a few numbers per example, so the gather costs nothing.
  """
  if mesh is None:
    return fn(*args, axis_name=None)
  def per_shard(*a):
    return tuple(jax.lax.all_gather(o, DATA, tiled=True) for o in fn(*a, axis_name=DATA))
  # check_vma=False: the attacks' loop carries start from the replicated eps yet
  # vary per shard, which the varying-axes type check rejects; the only
  # collectives are the final gather and a batch loss's sums.
  return jax.shard_map(per_shard, mesh=mesh, in_specs=in_specs, out_specs=P(),
                       check_vma=False)(*args)


def perturbation(x, x_adv, norm="linf"):
  """-> (distance (B,) in `norm`, x_adv finite and in [0, 1] (B,)): the checks of
  the returned images, run on the device so the images never travel to the host."""
  delta = (x_adv.astype(jnp.float32) - x.astype(jnp.float32)).reshape(x.shape[0], -1)
  dist = (jnp.max(jnp.abs(delta), axis=1) if norm == "linf"
          else jnp.sqrt(jnp.sum(delta * delta, axis=1)))
  flat = x_adv.reshape(x.shape[0], -1)
  in_range = (jnp.all(jnp.isfinite(flat), axis=1) & (jnp.min(flat, axis=1) >= 0)
              & (jnp.max(flat, axis=1) <= 1))
  return dist, in_range


@functools.partial(jax.jit, static_argnames=("model_fn", "mesh"))
def _clean_batch(variables, x, y, *, model_fn, mesh):
  """-> logits (B, C), max |grad CE| (B,), grad finite (B,)."""
  def run(variables, x, y, axis_name):
    del axis_name
    def loss(x):
      logits = model_fn(variables, x).astype(jnp.float32)
      return jnp.sum(attacks.ce_objective(logits, y)), logits
    (_, logits), grad = jax.value_and_grad(loss, has_aux=True)(x)
    grad = grad.astype(jnp.float32).reshape(x.shape[0], -1)
    return logits, jnp.max(jnp.abs(grad), axis=1), jnp.all(jnp.isfinite(grad), axis=1)
  return sharded(run, mesh, (P(), P(DATA), P(DATA)), variables, x, y)


@functools.partial(jax.jit, static_argnames=("model_fn", "mesh"))
def _logits_batch(variables, x, *, model_fn, mesh):
  def run(variables, x, axis_name):
    del axis_name
    return (model_fn(variables, x).astype(jnp.float32),)
  return sharded(run, mesh, (P(), P(DATA)), variables, x)[0]


@functools.partial(jax.jit, static_argnames=("model_fn", "attack", "norm", "mesh"))
def _attack_batch(variables, x, y, ids, valid, base_key, eps, target, iterations, *,
                  model_fn, attack, norm, mesh):
  """-> (logits of x_adv (B, C), distance (B,), x_adv finite and in [0, 1] (B,)).

  eps, the target index (targeted attacks: which of the top wrong classes) and
  the iteration count are traced: one compilation serves every budget, every
  target, the full attack and the eps = 0 check's single iteration. The checks of
  the returned images run here, on the device, so the images themselves never
  travel to the host. Padding rows (valid False) are masked out of
  batch-coupled objectives with IGNORE_INDEX.
  """
  def run(variables, x, y, ids, valid, base_key, eps, target, iterations, axis_name):
    fn = functools.partial(model_fn, variables)
    keys = jax.vmap(functools.partial(jax.random.fold_in, base_key))(ids)
    record = ATTACKS[attack.name]
    if record.targeted:
      keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, target)
    if attack.loss is not None:
      y = jnp.where(valid, y, losses.IGNORE_INDEX)
    call = attacks.Call(keys, eps, norm, attack.objective(axis_name), target, iterations)
    x_adv = record.run(attack, fn, x, y, call)
    dist, in_range = perturbation(x, x_adv, norm)
    return fn(x_adv).astype(jnp.float32), dist, in_range
  specs = (P(), P(DATA), P(DATA), P(DATA), P(DATA), P(), P(), P(), P())
  return sharded(run, mesh, specs, variables, x, y, ids, valid, base_key, eps, target,
                  iterations)


# The eps = 0 check runs each attack's compiled program for this many iterations
# (at eps = 0 nothing can move; what is checked is that the code path returns
# the clean images); the cascade runs them in full (FULL >= any step count).
EPS0_ITERATIONS = 2
FULL = 2**30


def ball_tol(eps, norm, numel):
  """How far past eps an image may be and still count as inside the ball: float32
  rounding of x0 + delta, a few ulps per pixel; for L2 they add up."""
  return 1e-6 if norm == "linf" else 1e-5 * eps + 1e-6 * np.sqrt(numel)


def in_ball(dist, in_range, eps, norm, numel):
  """(B,) bool: the adversarial image is in [0, 1] and within eps (ball_tol)."""
  return in_range & (dist <= eps + ball_tol(eps, norm, numel))


def attack_key(seed, eps, name):
  """The base key of attack `name` at budget eps (fold in the example index next)."""
  key = jax.random.fold_in(jax.random.key(seed), int(np.float32(eps).view(np.uint32)))
  return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


@dataclasses.dataclass
class Batch:
  """One fixed-size evaluation batch: arrays on the mesh, and host bookkeeping."""
  images: Any       # (B, H, W, C') on the devices
  labels: Any       # (B,) on the devices (None without labels)
  ids: Any          # (B,) source indices on the devices
  valid: Any        # (B,) on the devices
  host_labels: Optional[np.ndarray]
  host_valid: np.ndarray
  rows: np.ndarray  # positions in `indices` of each row (padding repeats the last)
  extra: dict = dataclasses.field(default_factory=dict)  # {name: (B, ...) on the devices}


# No batch shape gives a device fewer rows than this (halving a batch below it
# saves less run time than its compilation costs on the models we measured).
MIN_BUCKET_ROWS_PER_DEVICE = 8


def bucket_sizes(batch_size, num_devices=1, buckets=2):
  """The batch shapes an attack runs at: batch_size, then its halves.

  At most `buckets` sizes (None: every halving), each divisible by the device
  count with at least MIN_BUCKET_ROWS_PER_DEVICE rows per device (or batch_size
  alone). The points still robust fill batches of batch_size and the rest
  batches of the smaller sizes (`batches`), so a stage of the cascade pads fewer
  rows (padding rows cost as much as real ones). Each size is one compiled
  program per attack, compiled by the eps = 0 check, so the count never depends
  on the budgets: at most 1 + log2(batch_size / (8 x devices)) programs per
  attack (5 for 128 rows on one device), whatever the budgets and datasets.
  """
  sizes = [batch_size]
  while ((buckets is None or len(sizes) < buckets) and sizes[-1] % 2 == 0
         and (sizes[-1] // 2) % num_devices == 0
         and sizes[-1] // 2 >= MIN_BUCKET_ROWS_PER_DEVICE * num_devices):
    sizes.append(sizes[-1] // 2)
  return sizes


def split_rest(rest, sizes):
  """The batch sizes that carry the last `rest` points of a stage.

  Greedy: the smallest size that holds them when it pads fewer rows than the
  smallest size, else the largest size they fill and the rest again. With
  halving sizes the padding stays below the smallest size (113 points over
  128/64/32/16/8: 64 + 32 + 16 + 8, 7 rows of padding, not 15).
  """
  sizes = sorted(sizes)
  out = []
  while rest > 0:
    up = min((s for s in sizes if s >= rest), default=None)
    if up is not None and (up - rest < sizes[0] or up == sizes[0]):
      out.append(up)
      break
    down = max(s for s in sizes if s <= rest)
    out.append(down)
    rest -= down
  return out


def batches(source, indices, positions, batch_size, mesh, sizes=None, *, labels=True,
            extra=None):
  """Batches over source[indices[positions]], placed on the mesh.

  Full batches of batch_size, then the remainder in batches of `sizes`
  (default: batch_size alone; split_rest picks them); padding rows repeat the
  last example and are not valid. labels: read each example's 'label'. extra:
  {name: (N, ...) array over `indices`} rows that go along (e.g. caption tokens).
  """
  sizes = sorted(sizes or [batch_size])
  idx = np.asarray(indices)
  full = len(positions) // batch_size * batch_size
  chunks = [(positions[start:start + batch_size], batch_size)
            for start in range(0, full, batch_size)]
  start = full
  for size in split_rest(len(positions) - full, sizes):
    chunks.append((positions[start:start + size], size))
    start += size
  for pos, size in chunks:
    rows = np.concatenate([pos, np.repeat(pos[-1:], size - len(pos))])
    items = [source[int(i)] for i in idx[rows]]
    host = {"image": np.stack([item["image"] for item in items]),
            "id": idx[rows].astype(np.int32), "mask": np.arange(size) < len(pos)}
    if labels:
      host["label"] = np.stack([item["label"] for item in items])
    for name, arr in (extra or {}).items():
      host[name] = np.asarray(arr)[rows]
    dev = sharding.put_eval_batch(host, mesh)
    yield Batch(dev.pop("image"), dev.pop("label", None), dev.pop("id"), dev.pop("mask"),
                host.get("label"), host["mask"], rows, dev)


def warn(checks, message, category=SoundnessWarning):
  """Records a failed check in checks.warnings and raises it as a SoundnessWarning."""
  checks.warnings.append(message)
  warnings.warn(message, category, stacklevel=3)


# ----------------------------------------------------------------------------
# Results.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class EpsResult:
  """One suite's cascade at one budget.

  accuracy_after: {attack: accuracy after that attack of the cascade}, i.e.
  cumulative over it and the attacks before it (the last one equals
  robust_accuracy). broken: {attack: points it was first to break}.
  robust_mask / broken_by: per example in `indices` order ('clean' if
  misclassified to begin with, None if robust). outside_ball: adversarial
  images outside the ball or [0, 1] (never counted as successes).
  seconds_by_attack: wall seconds of each attack of the cascade (all its
  targets and batches), compilation included where it happened there.
  """
  eps: float
  robust_accuracy: float
  accuracy_after: dict
  broken: dict
  robust_mask: list
  broken_by: list
  outside_ball: int
  max_ball_excess: Optional[float]
  gradient_masking: bool
  masking_fraction: float
  seconds: float
  seconds_by_attack: dict = dataclasses.field(default_factory=dict)  # {attack: s}


@dataclasses.dataclass
class Checks:
  deterministic: bool = True
  logits_max_abs_diff: float = 0.0
  outputs_are_logits: bool = True
  gradients_ok: bool = True
  zero_gradient_fraction: float = 0.0
  nonfinite_gradient_fraction: float = 0.0
  eps0_ok: bool = True
  eps0: dict = dataclasses.field(default_factory=dict)
  ball_ok: bool = True
  gradient_masking: bool = False
  warnings: list = dataclasses.field(default_factory=list)

  @property
  def passed(self):
    return bool(self.deterministic and self.outputs_are_logits and self.gradients_ok
                and self.ball_ok and self.eps0_ok and not self.gradient_masking)

  def failed(self):
    """Short labels of the failed checks, for tables."""
    names = [("deterministic", "nondeterministic"), ("outputs_are_logits", "probabilities"),
             ("gradients_ok", "gradients"), ("ball_ok", "ball"), ("eps0_ok", "eps=0")]
    out = [label for key, label in names if not getattr(self, key)]
    return out + (["MASKING"] if self.gradient_masking else [])


@dataclasses.dataclass
class Clean:
  """The clean pass: per example (in `indices` order) and the first batch."""
  correct: np.ndarray
  pred: np.ndarray
  zero_gradient: int
  nonfinite_gradient: int
  first_batch: Any = None
  first_logits: Any = None

  @property
  def accuracy(self):
    return float(self.correct.mean())


@dataclasses.dataclass
class Result:
  """Clean and robust accuracy of one model, per suite and budget, with its checks."""
  num_examples: int
  indices: list
  norm: str
  seed: int
  batch_size: int
  batch_sizes: list  # the attacks' batch shapes (bucket_sizes)
  num_devices: int
  clean_accuracy: float
  suites: dict      # suite name -> [attack settings (dict)]
  robust: dict      # suite name -> [EpsResult], in eps_list order
  checks: Checks
  seconds: float = 0.0
  # Where the time went: compiling (incl. persistent-cache reads) vs running
  # the attacks, and how many programs were compiled or read from the cache.
  timing: dict = dataclasses.field(default_factory=dict)

  def to_dict(self):
    d = dataclasses.asdict(self)
    d["checks"]["passed"] = self.checks.passed
    return d


# ----------------------------------------------------------------------------
# The parts.
# ----------------------------------------------------------------------------


def clean_pass(model_fn, variables, source, indices, *, batch_size, mesh=None, bar=None,
               num_classes=None):
  """Clean predictions and input gradients of the CE at every evaluated point.

  num_classes: the classes that are real when the model pads its logits (the
  columns past it are masked, `evaluate`); first_logits keeps only those.
  """
  n = len(indices)
  clean = Clean(np.zeros(n, bool), np.zeros(n, np.int64), 0, 0)
  seen = 0
  for b in batches(source, indices, np.arange(n), batch_size, mesh):
    logits, gmax, gfinite = jax.device_get(
        _clean_batch(variables, b.images, b.labels, model_fn=model_fn, mesh=mesh))
    valid = b.host_valid
    logits = logits[:, :num_classes]
    pred = np.argmax(logits, axis=-1)
    clean.correct[b.rows[valid]] = (pred == b.host_labels)[valid]
    clean.pred[b.rows[valid]] = pred[valid]
    clean.zero_gradient += int(np.sum((gmax == 0) & gfinite & valid))
    clean.nonfinite_gradient += int(np.sum(~gfinite & valid))
    if clean.first_batch is None:
      clean.first_batch, clean.first_logits = b, logits
    seen += int(valid.sum())
    if bar is not None:
      bar.update()
      bar.set_postfix(clean_acc=f"{clean.correct.sum() / seen:.3f}")
  return clean


def soundness_checks(model_fn, variables, clean, checks, *, mesh=None):
  """Determinism, logits-not-probabilities and gradient checks, into `checks`."""
  b, logits0 = clean.first_batch, clean.first_logits
  valid0 = b.host_valid
  again = jax.device_get(_logits_batch(variables, b.images, model_fn=model_fn, mesh=mesh))
  again = again[:, :logits0.shape[-1]]  # the real classes (clean_pass's num_classes)
  diff = float(np.max(np.abs(again - logits0)[valid0])) if valid0.any() else 0.0
  scale = float(np.max(np.abs(logits0[valid0]))) if valid0.any() else 1.0
  checks.deterministic = bool(np.isfinite(diff) and diff <= 1e-4 * max(1.0, scale))
  checks.logits_max_abs_diff = diff
  if not checks.deterministic:
    warn(checks, f"the model is not deterministic: two calls on the same images differ "
          f"by up to {diff:.3g}. Randomised models need EOT attacks; these numbers "
          "overstate robustness.")
  rows_sum = logits0[valid0].sum(axis=-1)
  probs = bool(logits0[valid0].min() >= 0 and logits0[valid0].max() <= 1
               and np.allclose(rows_sum, 1.0, atol=1e-4))
  checks.outputs_are_logits = not probs
  if probs:
    warn(checks, "the model seems to return probabilities (rows in [0, 1] summing to 1); "
          "the attack losses expect logits, and a softmax before them can mask gradients")
  n = len(clean.correct)
  checks.zero_gradient_fraction = clean.zero_gradient / n
  checks.nonfinite_gradient_fraction = clean.nonfinite_gradient / n
  checks.gradients_ok = clean.zero_gradient == 0 and clean.nonfinite_gradient == 0
  if not checks.gradients_ok:
    warn(checks, f"input gradients of the cross-entropy at the clean points: "
          f"{clean.zero_gradient} of {n} are all zero and {clean.nonfinite_gradient} not "
          "finite; gradient-based attacks cannot move from there (masked or saturated "
          "gradients), so their robust accuracy is an overestimate")


def eps0_check(model_fn, variables, source, indices, clean, attack_list, checks, *, seed,
               norm, sizes, mesh=None):
  """Every attack at eps = 0 must return the clean images and predictions.

  Runs the cascade's own compiled programs (eps, target and iteration count are
  traced) at every batch size of the cascade (`sizes`, bucket_sizes), for
  EPS0_ITERATIONS iterations on the first examples.
  """
  n = len(indices)
  numel = int(np.prod(clean.first_batch.images.shape[1:]))
  # The first examples at every size: the clean pass's first batch is the full
  # size's (sizes[0] == its batch size), so only the smaller ones are loaded.
  probes = [clean.first_batch] + [next(batches(source, indices, np.arange(min(size, n)),
                                                size, mesh)) for size in sizes[1:]]
  for attack in attack_list:
    if attack.name in checks.eps0:
      continue  # the same attack in another suite
    dist_max, agree, in_range_all = 0.0, 1.0, True
    for b in probes:
      valid = b.host_valid
      logits, dist, in_range = jax.device_get(_attack_batch(
          variables, b.images, b.labels, b.ids, b.valid, attack_key(seed, 0.0, attack.name),
          jnp.float32(0.0), jnp.int32(0), jnp.int32(EPS0_ITERATIONS), model_fn=model_fn,
          attack=attack, norm=norm, mesh=mesh))
      dist_max = max(dist_max, float(np.max(dist[valid])))
      agree = min(agree, float(np.mean((np.argmax(logits, -1) == clean.pred[b.rows])[valid])))
      in_range_all &= bool(in_range[valid].all())
    checks.eps0[attack.name] = {"max_distance": dist_max, "prediction_agreement": agree,
                                "in_range": in_range_all}
  checks.eps0_ok = all(v["max_distance"] <= ball_tol(0.0, norm, numel)
                       and v["prediction_agreement"] == 1.0 and v["in_range"]
                       for v in checks.eps0.values())
  if not checks.eps0_ok:
    warn(checks, f"at eps=0 the attacks do not reproduce the clean predictions: "
          f"{checks.eps0}")


def cascade(model_fn, variables, source, indices, clean, attack_list, eps, checks, *,
            seed, norm, batch_size, sizes=None, mesh=None, masking_tol=MASKING_TOL,
            bar=None):
  """One suite at one budget: each attack on the points every earlier one failed on.

  sizes: the batch sizes (bucket_sizes; default batch_size alone). Targeted
  attacks run min(num_targets, C - 1) targets, C the real classes (the clean
  pass's logits), never a padded class.
  """
  t0 = time.time()
  n = len(indices)
  numel = None
  robust = clean.correct.copy()
  broken_by = np.where(clean.correct, None, "clean").astype(object)
  after, broken = {}, {}
  outside, excess = 0, -np.inf
  white_before, masked = False, 0
  num_classes = clean.first_logits.shape[-1]
  by_attack = {}
  for attack in attack_list:
    t_attack = time.time()
    broken[attack.name] = 0
    key = attack_key(seed, eps, attack.name)
    record = ATTACKS[attack.name]
    passes = range(min(attack.num_targets, num_classes - 1)) if record.targeted else range(1)
    for target in passes:
      positions = np.flatnonzero(robust)
      if bar is not None:
        what = f" target {target + 1}" if record.targeted else ""
        bar.reset(total=len(positions) // batch_size + len(split_rest(
            len(positions) % batch_size, sizes or [batch_size])),
                  desc=f"eps={format_eps(eps)} {attack.name}{what}")
      for b in batches(source, indices, positions, batch_size, mesh, sizes):
        numel = numel or int(np.prod(b.images.shape[1:]))
        logits, dist, in_range = jax.device_get(_attack_batch(
            variables, b.images, b.labels, b.ids, b.valid, key, jnp.float32(eps),
            jnp.int32(target), jnp.int32(FULL), model_fn=model_fn, attack=attack, norm=norm,
            mesh=mesh))
        valid = b.host_valid
        ok = in_range & (dist <= eps + ball_tol(eps, norm, numel))
        outside += int(np.sum(~ok & valid))
        if valid.any():
          excess = max(excess, float(np.max(dist[valid])) - eps)
        hit = valid & ok & (np.argmax(logits, -1) != b.host_labels)
        robust[b.rows[hit]] = False
        broken_by[b.rows[hit]] = attack.name
        broken[attack.name] += int(hit.sum())
        if record.black_box and white_before:
          masked += int(hit.sum())
        if bar is not None:
          bar.update()
          bar.set_postfix(robust_acc=f"{robust.sum() / n:.3f}")
    after[attack.name] = float(robust.mean())
    by_attack[attack.name] = time.time() - t_attack
    white_before |= not record.black_box
  masking = masked / n > masking_tol
  if outside:
    warn(checks, f"eps={eps:.6g}: {outside} adversarial images were outside the {norm} "
          f"ball or [0, 1] (by up to {excess:.3g}); they were not counted")
  if masking:
    warn(checks, f"eps={eps:.6g}: gradient masking suspected: the black-box attack(s) "
          f"{sorted(a.name for a in attack_list if ATTACKS[a.name].black_box)} broke "
          f"{masked} of {n} "
          "points on which every white-box attack before them failed",
          GradientMaskingWarning)
  return EpsResult(
      eps=eps, robust_accuracy=float(robust.mean()), accuracy_after=after, broken=broken,
      robust_mask=robust.tolist(), broken_by=broken_by.tolist(), outside_ball=outside,
      max_ball_excess=excess if np.isfinite(excess) else None, gradient_masking=masking,
      masking_fraction=masked / n, seconds=time.time() - t0, seconds_by_attack=by_attack)


# ----------------------------------------------------------------------------
# The skeleton every task's evaluation runs (classifiers here; captioners in
# prsl_jax.captioning): checked inputs, then its parts in order, timed.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Inputs:
  """An evaluation's checked inputs (`prepare`)."""
  eps_list: list
  indices: np.ndarray  # (N,) int64
  batch_size: int
  num_devices: int
  variables: Any       # replicated over the mesh when there is one


def prepare(eps_list, indices, batch_size, norm, mesh, variables) -> Inputs:
  """Checks budgets, indices, batch size and mesh; replicates variables on the mesh."""
  eps_list = check_eps_list(eps_list, norm)
  indices = np.asarray(indices, dtype=np.int64)
  if indices.ndim != 1 or not len(indices):
    raise ValueError(f"indices must be a non-empty 1-D array, got shape {indices.shape}")
  batch_size = losses.check_int("batch_size", batch_size, minimum=1)
  num_devices = 1
  if mesh is not None:
    if DATA not in mesh.axis_names:
      raise ValueError(f"mesh must have a '{DATA}' axis, got axes {mesh.axis_names}")
    num_devices = mesh.shape[DATA]
    if batch_size % num_devices:
      raise ValueError(f"batch_size={batch_size} must be divisible by the number of "
                       f"devices on the mesh's '{DATA}' axis ({num_devices})")
    # Replicated on every device (a multi-host run needs global arrays).
    variables = sharding.replicate(variables, mesh, copy=False)
  return Inputs(eps_list, indices, batch_size, num_devices, variables)


@dataclasses.dataclass(frozen=True)
class Parts:
  """What a task's evaluation supplies to `skeleton`, each a function.

  clean_pass() -> clean: per-example clean outcomes (and what the checks reuse).
  soundness_checks(clean, checks): determinism, outputs, input gradients.
  eps0_check(clean, checks): every attack at eps = 0 changes nothing.
  cascades(clean, checks) -> its per-suite, per-budget results.
  """
  clean_pass: Callable
  soundness_checks: Callable
  eps0_check: Callable
  cascades: Callable


def skeleton(parts: Parts, checks: Checks, bar=None):
  """Runs the parts in order; -> (clean, cascades' results, timing).

  timing: compile seconds (JAX's own events, persistent-cache reads included),
  programs compiled and read from the cache (compilation.Timer), then
  clean_and_checks_seconds and attack_seconds (wall seconds less compilation).
  """
  with compilation.Timer() as timer:
    t_clean = time.time()
    clean = parts.clean_pass()
    parts.soundness_checks(clean, checks)
    parts.eps0_check(clean, checks)
    before_attacks, t_attacks = timer.seconds, time.time()
    results = parts.cascades(clean, checks)
  if bar is not None:
    bar.close()
  timing = dict(timer.as_dict(), clean_and_checks_seconds=t_attacks - t_clean,
                attack_seconds=time.time() - t_attacks - (timer.seconds - before_attacks))
  return clean, results, timing


def evaluate(model_fn: Callable, variables, source, indices, *, eps_list,
             suites=None, norm="linf", seed=0, batch_size=64, buckets=2, mesh=None,
             masking_tol=MASKING_TOL, progress_bar=True, num_classes=None) -> Result:
  """Clean and robust accuracy of a classifier under attack cascades.

  Args:
    model_fn: value-hashable fn(variables, images (B, H, W, C') float32 in
      [0, 1]) -> (B, C) logits, e.g. zeroshot.Classifier(model).
    variables: pytree passed to model_fn (replicated over the mesh).
    source: random-access source of dicts with 'image' and 'label' (prsl_jax.data).
    indices: int array, the examples of `source` to evaluate (N of them).
    eps_list: budgets in [0, 1] pixel units (L-inf per pixel, L2 per image).
    suites: {name: tuple of Attack} (make_suite), each its own cascade; or a
      tuple of Attack; default {"standard": make_suite("standard", norm)}.
    norm: 'linf' or 'l2'.
    seed: PRNG seed of the attacks (see the module docstring).
    batch_size: rows per attack call; must divide by the number of devices of
      `mesh`. The last batch of each stage is padded to the smallest of
      `buckets` sizes (batch_size and its halves, bucket_sizes) that holds it.
    buckets: how many batch sizes each attack is compiled for (>= 1; 1: every
      batch padded to batch_size; None: every halving down to
      MIN_BUCKET_ROWS_PER_DEVICE rows per device). All are compiled, and
      checked, by the eps = 0 check, so the compilations never depend on the
      budgets.
    mesh: jax.sharding.Mesh with axis 'data', or None for one device.
    masking_tol: fraction of points a black-box attack may break, after the
      white-box ones failed on them, before the masking flag is raised.
    progress_bar: show progress (one line per stage when not on a terminal).
    num_classes: the real classes C when model_fn pads its logits to more
      columns (masked to a large negative, e.g. zeroshot.Classifier with a
      class_mask, so that datasets of different class counts share one compiled
      program per attack): predictions, checks and target counts see only the
      first C columns. None: every column is a class.

  Returns:
    Result (Result.to_dict() is JSON-serialisable).
  """
  t0 = time.time()
  if suites is None:
    suites = {"standard": make_suite("standard", norm)}
  elif not isinstance(suites, dict):
    suites = {"+".join(a.name for a in suites): tuple(suites)}
  for name, suite in suites.items():
    if not suite or not all(isinstance(a, Attack) for a in suite):
      raise ValueError(f"suite {name!r} must be a non-empty tuple of Attack (make_suite)")
    make_suite([a.name for a in suite], norm)  # names and norms
  run = prepare(eps_list, indices, batch_size, norm, mesh, variables)
  eps_list, indices, batch_size, variables = (run.eps_list, run.indices, run.batch_size,
                                              run.variables)
  if buckets is not None:
    buckets = losses.check_int("buckets", buckets, minimum=1)
  n = len(indices)
  checks = Checks()
  sizes = bucket_sizes(batch_size, run.num_devices, buckets)
  every_attack = [a for suite in suites.values() for a in suite]

  bar = progress.bar(total=-(-n // batch_size), desc="clean", enabled=progress_bar)
  clean, robust, timing = skeleton(Parts(
      clean_pass=lambda: clean_pass(model_fn, variables, source, indices,
                                    batch_size=batch_size, mesh=mesh, bar=bar,
                                    num_classes=num_classes),
      soundness_checks=lambda clean, checks: soundness_checks(model_fn, variables, clean,
                                                             checks, mesh=mesh),
      # eps = 0 runs the cascade's own compiled attacks (eps is traced): after it,
      # the cascades below compile nothing, whatever the number of budgets.
      eps0_check=lambda clean, checks: eps0_check(
          model_fn, variables, source, indices, clean, every_attack, checks, seed=seed,
          norm=norm, sizes=sizes, mesh=mesh),
      cascades=lambda clean, checks: {
          name: [cascade(model_fn, variables, source, indices, clean, suite, eps, checks,
                         seed=seed, norm=norm, batch_size=batch_size, sizes=sizes, mesh=mesh,
                         masking_tol=masking_tol, bar=bar) for eps in eps_list]
          for name, suite in suites.items()}), checks, bar)
  num_devices = run.num_devices
  checks.ball_ok = all(r.outside_ball == 0 for rs in robust.values() for r in rs)
  checks.gradient_masking = any(r.gradient_masking for rs in robust.values() for r in rs)
  return Result(
      num_examples=n, indices=indices.tolist(), norm=norm, seed=seed,
      batch_size=batch_size, batch_sizes=sizes, num_devices=num_devices,
      clean_accuracy=clean.accuracy,
      suites={name: [dataclasses.asdict(a) for a in suite] for name, suite in suites.items()},
      robust=robust, checks=checks, seconds=time.time() - t0, timing=timing)


def format_eps(eps):
  """4/255 for multiples of 1/255, else the number."""
  k = eps * 255
  if eps and abs(k - round(k)) < 1e-6:
    return f"{round(k)}/255"
  return f"{eps:g}"

