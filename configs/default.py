"""The embedded default: fine-tune the bundled tiny CLIP on the digits with PRSL.

No download needed. Trains the authors' PRSL (window 0:4, b = 1e-3, batch 32: the
study's setting, RESULTS.md) and a cross-entropy baseline from the same start, then evaluates the three models under the paper's attack (BIM-10
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
  # The authors' window 0:4 and class-default b = 1e-3 (configs/base.py), on a
  # global batch of 32: the setting the study measured (RESULTS.md). PRSL's x
  # sums over the batch's rows, so b's effect is tied to the batch size; at 32
  # rows on this model b = 1e-3 is a share of ~22 (the PRSL term pulls ~22x
  # harder than CE at the start): in the study's 3 seeds, 2.6 points above CE
  # under the full cascade at 2/255, a few images of 64; README shows how one
  # run of this config comes out.
  c.batch_size = 32
  c.eval.batch_size = 32  # the paper's attack through PRSL groups its rows as training did
  if "runlocal" in flags:
    common.runlocal(c)
  return c
