"""The embedded default: fine-tune the bundled tiny CLIP on the digits with PRSL.

No download needed. Trains the authors' PRSL and a cross-entropy baseline from the
same start, then evaluates the three models under the paper's attack (BIM-10
through each model's own training loss), PGD-CE and APGD-CE + APGD-T.
',runlocal' shrinks it to a seconds-long smoke run.

  python train.py                                  # this config
  python train.py --config configs/default.py --config.loss.end=6 --workdir /tmp/run
  python train.py --config configs/default.py:runlocal --workdir /tmp/smoke
"""

from configs import base
from configs import common

VARIANTS = ()
FLAGS = ("runlocal",)


def get_config(arg=None):
  _, flags = common.parse_arg(arg, variants=VARIANTS, flags=FLAGS)
  c = base.base_config()
  if "runlocal" in flags:
    common.runlocal(c)
  return c
