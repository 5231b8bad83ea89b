"""One record per attack: how an evaluation calls it and what it supports.

    record = ATTACKS["apgd-t"]
    x_adv = record.run(settings, logits_fn, x, y, Call(keys, eps, "linf", "ce", target, None))

Every evaluation (classifier cascades in prsl_jax.evaluation, caption cascades in
prsl_jax.captioning, the paper's attack at training time) reads the flags here
and calls `run`; nothing else names an attack. Adding an attack is its module in
prsl_jax/attacks/ plus one record in ATTACKS.

An adapter is run(settings, logits_fn, x, y, call) -> x_adv, where settings is
the suite's hashable Attack (prsl_jax.evaluation.Attack: steps, queries,
num_targets, restarts, loss), logits_fn(x) -> (B, C) or token logits (B, T, V),
y the labels ((B,) or (B, T), IGNORE_INDEX on padding) and call the per-batch
arguments below.
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import jax.numpy as jnp

from prsl_jax.attacks import core
from prsl_jax.attacks.apgd import apgd
from prsl_jax.attacks.apgd import apgd_targeted
from prsl_jax.attacks.fab import fab_targeted
from prsl_jax.attacks.pgd import bim
from prsl_jax.attacks.pgd import fgsm
from prsl_jax.attacks.pgd import pgd
from prsl_jax.attacks.square import square


class Call(NamedTuple):
  """The per-batch arguments of an adapter (arrays may be traced).

  keys: (B,) per-example PRNG keys. eps: the budget. norm: 'linf' | 'l2'.
  objective: 'ce' or fn(logits, labels) -> scalar, the model's training loss
  (used by records with training_loss=True). target: int index, which of the
  top wrong classes (records with targeted=True). iterations: stop after this
  many iterations (the eps = 0 check), or None for the full attack. toward:
  the labels are targets to reach (a target caption), not classes to leave.
  """
  keys: Any
  eps: Any
  norm: str = "linf"
  objective: Any = "ce"
  target: Any = 0
  iterations: Any = None
  toward: bool = False


@dataclasses.dataclass(frozen=True)
class AttackRecord:
  """One attack. run: its adapter (module docstring). black_box: never sees a
  gradient, so masked gradients cannot fool it (the masking check). linf_only:
  no L2 version. targeted: runs as AutoAttack runs APGD-T and FAB-T, one target
  class at a time (the k-th most likely wrong class), each only on the points
  every earlier target failed on. tokens: works on token logits (captions).
  deterministic: draws no random numbers. training_loss: attacks through the
  model's own training loss (the paper's protocol). default_steps: iterations
  when a suite sets none.
  """
  run: Callable
  black_box: bool = False
  linf_only: bool = False
  targeted: bool = False
  tokens: bool = False
  deterministic: bool = False
  training_loss: bool = False
  default_steps: int = 100


def target_class(fn, x, y, index, num_targets):
  """(B,) the index-th most likely wrong class of the clean logits (index traced).

  AutoAttack's order (autopgd_base.py, fab_base.py): target 0 is the runner-up.
  """
  top = core.top_wrong_classes(fn(x), y, num_targets)
  return jnp.take_along_axis(top, jnp.broadcast_to(index, y.shape)[:, None], axis=1)[:, 0]


def _apgd(loss):
  def run(a, fn, x, y, c):
    return apgd(fn, x, y, key=c.keys, eps=c.eps, steps=a.steps, norm=c.norm, loss=loss,
                restarts=a.restarts, targeted=c.toward, max_iterations=c.iterations)
  return run


def _pgd(loss):
  def run(a, fn, x, y, c):
    return pgd(fn, x, y, key=c.keys, eps=c.eps, steps=a.steps, norm=c.norm, loss=loss,
               step_size=getattr(a, "step_size", None), restarts=a.restarts, targeted=c.toward, max_iterations=c.iterations)
  return run


def _apgd_t(a, fn, x, y, c):
  t = target_class(fn, x, y, c.target, a.num_targets)
  return apgd_targeted(fn, x, y, key=c.keys, eps=c.eps, steps=a.steps, norm=c.norm,
                       restarts=a.restarts, target_labels=t, max_iterations=c.iterations)


def _fab_t(a, fn, x, y, c):
  t = target_class(fn, x, y, c.target, a.num_targets)
  return fab_targeted(fn, x, y, key=c.keys, eps=c.eps, steps=a.steps, norm=c.norm,
                      restarts=a.restarts, target_labels=t, max_iterations=c.iterations)


def _square(a, fn, x, y, c):
  return square(fn, x, y, key=c.keys, eps=c.eps, queries=a.queries, norm=c.norm,
                max_iterations=c.iterations)


def _fgsm(a, fn, x, y, c):
  del a  # one step, no key; L-inf only (checked up front)
  return fgsm(fn, x, y, eps=c.eps, targeted=c.toward)


def _bim(a, fn, x, y, c):
  # Deterministic, L-inf only (checked up front), through the training loss.
  return bim(fn, x, y, eps=c.eps, steps=a.steps, loss=c.objective, targeted=c.toward,
             max_iterations=c.iterations)


ATTACKS = {
    "apgd-ce": AttackRecord(_apgd("ce"), tokens=True),
    "apgd-dlr": AttackRecord(_apgd("dlr")),
    "apgd-t": AttackRecord(_apgd_t, targeted=True),
    "fab-t": AttackRecord(_fab_t, targeted=True),
    "square": AttackRecord(_square, black_box=True),
    "pgd-ce": AttackRecord(_pgd("ce"), tokens=True),
    "pgd-cw": AttackRecord(_pgd("cw")),
    "fgsm": AttackRecord(_fgsm, linf_only=True, tokens=True, deterministic=True),
    "bim": AttackRecord(_bim, linf_only=True, tokens=True, deterministic=True,
                        training_loss=True, default_steps=10),
}


def names(flag: str) -> frozenset:
  """The attacks whose record has `flag` set, e.g. names('black_box')."""
  return frozenset(n for n, r in ATTACKS.items() if getattr(r, flag))
