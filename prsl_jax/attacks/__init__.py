"""Adversarial attacks: FGSM, PGD, BIM (the paper's), APGD, APGD-T, Square and FAB-T.

Conventions shared by every attack (docs/design.md section 2):

- `logits_fn(x) -> (B, C)` is any JAX function of images x (B, H, W, C') float32
  NHWC in [0, 1]; pixel normalisation belongs inside it, so budgets are in [0, 1]
  pixel units (eps = 4/255 means 4/255). Gradient attacks (FGSM, PGD, BIM, APGD)
  also take token logits (B, T, V) with labels (B, T), e.g. a caption
  teacher-forced through a captioner, IGNORE_INDEX (-100) masking padding.
- Every attack returns float32 images inside the eps-ball around the input
  (L-inf or L2, over all of H, W, C' of one example) intersected with [0, 1], up
  to float32 rounding of x0 + delta (a few ulps).
- Logits are cast to float32 before the objective, so gradients are float32
  whatever the model's compute dtype.
- Every attack returns, per example, its best iterate: a fooled iterate
  (misclassified; for targeted attacks the target reached; for APGD-T reaching
  the target beats mere misclassification) beats a robust one; among equals the
  higher objective wins. The last iterate is never returned just for being last.
- Pure, with an explicit PRNG key. `key` is either one key, split here into one
  key per example, or a batch of B keys, one per example. With one key the draws
  depend on the batch (its size and an example's position in it); with
  per-example keys (e.g. fold_in(key, global_index)) they do not, so 1 device
  and N devices under jax.shard_map give the same adversarial images.
- Compiled once whatever `steps` / `queries` / `restarts` / number of targets:
  steps are a lax.fori_loop, restarts and targets a lax.scan. `steps`,
  `restarts`, `queries`, `norm`, `loss` are static Python values (mark them
  static under jit); eps and step_size may be Python floats or traced scalars,
  so one compilation serves every budget.
- Arguments are validated at trace time, before any compute, with errors naming
  the argument. Values (eps >= 0 and <= 1 for L-inf, images finite and in
  [0, 1], labels in [0, C)) are checked when concrete; under jit they are
  tracers, and an invalid eps or label turns that example's output into NaN
  (attacks.core.finalize), never into a plausible image.

FAB-T (attacks.fab) is a minimum-norm attack: it returns, per example, the
closest misclassified point it found when that is within eps, else the clean
image, so "broken at eps" means what it means for the other attacks.

Objectives (attacks.objectives) are "higher = stronger attack", per example:
cross-entropy, the CW margin, DLR (needs C >= 3; targeted DLR C >= 4) and any
loss of prsl_jax.losses, PRSL included.

The registry (attacks.registry.ATTACKS): one AttackRecord per attack, its
adapter and flags (black-box, L-inf only, targeted, usable on token logits,
default steps). Adding an attack is its module here plus one record there.
"""

from prsl_jax.attacks.apgd import apgd
from prsl_jax.attacks.apgd import apgd_targeted
from prsl_jax.attacks.core import NORMS
from prsl_jax.attacks.fab import fab_targeted
from prsl_jax.attacks.objectives import IGNORE_INDEX
from prsl_jax.attacks.objectives import OBJECTIVES
from prsl_jax.attacks.objectives import ce_objective
from prsl_jax.attacks.objectives import cw_margin
from prsl_jax.attacks.objectives import dlr_loss
from prsl_jax.attacks.objectives import dlr_targeted_loss
from prsl_jax.attacks.pgd import bim
from prsl_jax.attacks.pgd import fgsm
from prsl_jax.attacks.pgd import pgd
from prsl_jax.attacks.registry import ATTACKS
from prsl_jax.attacks.registry import AttackRecord
from prsl_jax.attacks.registry import Call
from prsl_jax.attacks.square import square
