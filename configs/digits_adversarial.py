"""TeCoA-style adversarial fine-tuning of the tiny CLIP on the digits, PRSL vs CE.

  python train.py --config configs/digits_adversarial.py
"""

from configs import base


def get_config(arg=None):
  del arg
  c = base.base_config()
  c.workdir = "runs/digits_adversarial"
  c.adversarial.enabled = True
  c.adversarial.eps = 4 / 255
  c.adversarial.steps = 2
  return c
