"""A few PRSL steps of the bundled tiny CLIP: the trainer tests' config."""

from configs import base


def get_config(arg=None):
  del arg
  c = base.base_config()
  c.batch_size = 16
  c.total_steps = 6
  c.log_every = 1
  c.checkpoint_every = 2
  c.keep_checkpoints = 5
  c.loss.end = 4
  c.loss.weight = 1e-2  # the authors' PRSL, strong enough to move training here
  # Clean by default: L-inf PGD steps by sign(grad), so float-level differences
  # between topologies flip pixels and compound over steps; the adversarial path
  # has its own short topology test.
  c.adversarial.enabled = False
  c.adversarial.eps = 4 / 255
  c.adversarial.steps = 2
  # Momentum SGD, not Adam: Adam's g / sqrt(v) turns float noise in near-zero
  # gradients into full-size steps, which would hide a real topology bug behind a
  # loose tolerance. With SGD, 1 vs 8 devices agree to ~1e-7.
  c.optimizer.name = "sgd"
  c.optimizer.warmup_steps = 0
  c.optimizer.lr = 0.05
  return c


