"""Contrastive PRSL fine-tuning on digit images paired with captions.

PRSL is applied to the vision-language objective itself: contrastive_loss with
the PRSL row loss over the global batch (k <= batch_size - 1).

  python train.py --config configs/digits_contrastive.py
"""

from configs import base


def get_config(arg=None):
  del arg
  c = base.base_config()
  c.workdir = "runs/digits_contrastive"
  c.objective = "contrastive"
  c.train_towers = "vision"
  c.loss.k = 5
  return c
