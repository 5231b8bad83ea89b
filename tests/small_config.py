"""A few adversarial PRSL steps of the bundled tiny CLIP: the trainer tests' config."""

from configs import base


def get_config(arg=None):
  del arg
  c = base.base_config()
  c.batch_size = 16
  c.total_steps = 6
  c.log_every = 1
  c.checkpoint_every = 2
  c.keep_checkpoints = 5
  c.loss.k = 3
  c.adversarial.enabled = True  # exercises per-example random starts
  c.adversarial.eps = 4 / 255
  c.adversarial.steps = 2
  c.optimizer.warmup_steps = 2
  c.optimizer.lr = 1e-3
  return c


