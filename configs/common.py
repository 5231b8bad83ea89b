"""What the config files share: `get_config(arg)` parsing, the runlocal shrink and
the starting PRSL weight of a full-scale run.

A config argument is 'variant[,flag...]', e.g. 'adv_prsl,runlocal'. Each config
file names its choices at module level, so tests and tools can list them:

    VARIANTS = ("prsl", "ce")    # the first is the default; () for a file without
    FLAGS = ("runlocal",)

    def get_config(arg=None):
      variant, flags = common.parse_arg(arg, variants=VARIANTS, flags=FLAGS)
      c = base.base_config()
      ...
      if "runlocal" in flags:
        common.runlocal(c)     # last, so it shrinks whatever the variant set
      return c
"""

# The fields runlocal sets, and to what: the same everywhere.
RUNLOCAL = {
    "batch_size": 8,
    "total_steps": 4,
    "optimizer.warmup_steps": 1,
    "log_every": 2,
    "eval_every": 2,
    "checkpoint_every": 2,
    "eval.num_examples": 16,
    "eval.batch_size": 8,
    "eval.steps": 2,
    "eval.queries": 8,
    "eval.num_targets": 2,
}
# And adversarial.steps is capped at this (a config with PGD-1 keeps PGD-1).
RUNLOCAL_MAX_ADV_STEPS = 2

# The authors' ViT-GPT2 setting (arXiv:2402.03627; docs/design.md section 1):
# b = 1e-5 on per-GPU groups of 8 captions x 128 token rows. PRSL's spread term
# x sums over the rows of a group, so its gradient grows about linearly with the
# group's row count n while the mean cross-entropy's does not: keeping b * n fixed
# keeps the two gradients in the authors' proportion.
AUTHORS_WEIGHT_TIMES_ROWS = 1e-5 * 8 * 128


def parse_arg(arg, *, variants=(), flags=("runlocal",), default=None):
  """'variant,flag,...' -> (variant, set of flags); errors name the bad part.

  Args:
    arg: the text after ':' in --config file.py:arg (None or '' = the default).
    variants: the file's variants, the first being the default; () for a file
      without variants, whose argument is flags only ('runlocal').
    flags: the flags the file accepts.
    default: the variant used when arg names none (default: variants[0]).

  Returns:
    (variant or None, set of flags).
  """
  parts = [part.strip() for part in (arg or "").split(",") if part.strip()]
  variant = None
  if variants:
    variant = default or variants[0]
    if parts and parts[0] not in flags:
      variant = parts.pop(0)
    if variant not in variants:
      raise ValueError(f"unknown config variant {variant!r}; choose one of {list(variants)}")
  unknown = [part for part in parts if part not in flags]
  if unknown:
    raise ValueError(f"unknown config flag {unknown[0]!r} in {arg!r}; allowed flags: "
                     f"{list(flags)}" + (f", after a variant of {list(variants)}"
                                         if variants else ""))
  return variant, set(parts)


def runlocal(c):
  """Shrinks a full-scale config to a seconds-long smoke run, the same way everywhere.

  Sets the RUNLOCAL fields and caps adversarial.steps; leaves the model, data,
  loss and budgets alone, so the smoke run exercises the real setting.
  """
  for name, value in RUNLOCAL.items():
    section, _, field = name.rpartition(".")
    (c[section] if section else c)[field] = value
  c.adversarial.steps = min(c.adversarial.steps, RUNLOCAL_MAX_ADV_STEPS)
  return c


def prsl_start_weight(rows):
  """A starting PRSL weight b for groups of `rows` rows: the authors' b * n, over n.

  A starting value only: the proportion of PRSL's gradient to CE's depends on
  how confident the model is (measure it on yours: scripts/prsl_study.py
  compares the two gradients; docs/design.md section 1).
  """
  return AUTHORS_WEIGHT_TIMES_ROWS / rows
