"""The embedded default: fine-tune the bundled tiny CLIP on the digits with PRSL.

No download needed. Trains PRSL and a cross-entropy baseline from the same start,
then prints clean / PGD-CE / APGD-DLR accuracy of all three models.

  python train.py                                  # this config
  python train.py --config configs/default.py --config.loss.k=5 --workdir /tmp/run
"""

from configs import base


def get_config(arg=None):
  del arg
  return base.base_config()
