"""The embedded default: fine-tune the bundled tiny CLIP on the digits with PRSL.

No download needed. Trains the authors' PRSL and a cross-entropy baseline from the
same start, then evaluates the three models under the paper's attack (BIM-10
through each model's own training loss), PGD-CE and APGD-CE + APGD-T.

  python train.py                                  # this config
  python train.py --config configs/default.py --config.loss.end=6 --workdir /tmp/run
"""

from configs import base


def get_config(arg=None):
  del arg
  return base.base_config()
