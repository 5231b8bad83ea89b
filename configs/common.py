"""What the config files share: `get_config(arg)` parsing and the runlocal shrink.

A config argument is 'variant[,flag...]', e.g. 'adv_prsl,runlocal':

    variant, flags = common.parse_arg(arg, variants=("prsl", "ce"), flags=("runlocal",))
    if "runlocal" in flags:
      common.runlocal(c)
"""


def parse_arg(arg, *, variants, flags=("runlocal",), default=None):
  """'variant,flag,...' -> (variant, set of flags); errors name the bad part."""
  arg = arg or default or variants[0]
  variant, *given = [part.strip() for part in arg.split(",")]
  if variant not in variants:
    raise ValueError(f"config variant must be one of {list(variants)}, got {variant!r}")
  unknown = sorted(set(given) - set(flags))
  if unknown:
    raise ValueError(f"unknown config flag(s) {unknown}; allowed: {list(flags)}")
  return variant, set(given)


def runlocal(c):
  """Shrinks a full-scale config to a seconds-long smoke run, the same way everywhere."""
  c.batch_size = 8
  c.total_steps = 4
  c.optimizer.warmup_steps = 1
  c.log_every = c.eval_every = c.checkpoint_every = 2
  c.eval.num_examples = 16
  c.eval.batch_size = 8
  c.eval.steps = 2
  c.eval.queries = 8
  c.eval.num_targets = 2
  c.adversarial.steps = min(c.adversarial.steps, 2)
  return c
