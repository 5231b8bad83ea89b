"""TeCoA-style adversarial fine-tuning of the tiny CLIP on the digits, PRSL vs CE.

Every training step attacks the batch with PGD-2 at 4/255 (L-inf, [0, 1]
pixels) and trains on the adversarial images; the CE baseline is trained the
same way from the same start. ',runlocal' shrinks it to a smoke run.

  python train.py --config configs/digits_adversarial.py
  python train.py --config configs/digits_adversarial.py:runlocal --workdir /tmp/smoke
"""

from configs import base
from configs import common

VARIANTS = ()
FLAGS = ("runlocal",)


def get_config(arg=None):
  _, flags = common.parse_arg(arg, variants=VARIANTS, flags=FLAGS)
  c = base.base_config()
  c.workdir = "runs/digits_adversarial"
  c.adversarial.enabled = True
  c.adversarial.eps = 4 / 255
  c.adversarial.steps = 2
  if "runlocal" in flags:
    common.runlocal(c)
  return c
