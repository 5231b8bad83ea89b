"""Contrastive PRSL fine-tuning on digit images paired with captions.

PRSL is applied to the vision-language objective itself: CLIP's symmetric
image-text loss (losses.contrastive_loss) with PRSL as the batch loss in each
direction. A row's classes are the captions of the global batch, so its wrong
classes are the other B - 1 captions: the window start:end must fit in B - 1
(0:4 in 63 here), and the spread term couples every row of the global batch.
The captions of a digit are drawn from data.DIGIT_CAPTIONS.

  python train.py --config configs/digits_contrastive.py
  python train.py --config configs/digits_contrastive.py:runlocal --workdir /tmp/smoke
"""

from configs import base
from configs import common

VARIANTS = ()
FLAGS = ("runlocal",)


def get_config(arg=None):
  _, flags = common.parse_arg(arg, variants=VARIANTS, flags=FLAGS)
  c = base.base_config()
  c.workdir = "runs/digits_contrastive"
  c.objective = "contrastive"
  c.train_towers = "vision"
  if "runlocal" in flags:
    common.runlocal(c)
  return c
