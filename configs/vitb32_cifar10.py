"""CLIP ViT-B/32 fine-tuned on CIFAR-10 through the zero-shot head (TeCoA's protocol).

TeCoA (Mao et al., ICLR 2023, arXiv:2212.07016): the vision tower is trained
through the zero-shot head ("This is a photo of a {}"), text frozen; adversarial
variants train on PGD-2 images at eps 1/255 (L-inf, [0, 1] pixels) made at every
step. Evaluation: the paper's BIM-10 through each model's training loss, PGD-CE
(100 steps) and APGD-CE + APGD-T (100 steps, 9 targets) at 1/255 and 4/255.

Variants: 'prsl' (default), 'ce', 'adv_prsl', 'adv_ce' (TeCoA: adversarial CE);
',runlocal' shrinks everything for a quick check (configs/common.py). Needs the hub checkpoint (or a
local copy via --config.model.path) and CIFAR-10 prepared for TFDS as ArrayRecord
(`python -c "from prsl_jax import data; data.prepare('cifar10')"`; README "Data").

PRSL's weight. The authors' b (1e-5 for ViT-GPT2, 1e-6 for BLIP-2) was tuned for
groups of 8 captions x 128 token rows; its spread term sums over the rows, so
its gradient grows with the group. The starting value here keeps the authors'
b * rows: 1e-2 / 256 = 4e-5 for the global batch of 256 (configs/common.py's
prsl_start_weight). It is a start, not a tuned value: measure the ratio of the
PRSL and CE gradients on this model first (scripts/prsl_study.py does) and set
--config.loss.weight from it.

  python train.py --config configs/vitb32_cifar10.py:adv_prsl --workdir runs/b32_adv_prsl
  python train.py --config configs/vitb32_cifar10.py:prsl,runlocal --workdir /tmp/smoke
"""

from configs import base
from configs import common

VARIANTS = ("prsl", "ce", "adv_prsl", "adv_ce")
FLAGS = ("runlocal",)


def get_config(arg=None):
  variant, flags = common.parse_arg(arg, variants=VARIANTS, flags=FLAGS)
  c = base.base_config()
  c.workdir = f"runs/vitb32_cifar10_{variant}"
  c.model.path = "openai/clip-vit-base-patch32"
  c.data.name = "cifar10"
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.templates = "default"
  c.train_towers = "vision"
  c.loss.name = "ce" if variant.endswith("ce") else "prsl"
  c.compare_losses = ()
  c.adversarial.enabled = variant.startswith("adv")
  c.adversarial.eps = 1 / 255
  c.adversarial.steps = 2
  c.optimizer.lr = 1e-5
  c.optimizer.weight_decay = 1e-4
  c.optimizer.warmup_steps = 500
  c.batch_size = 256
  c.loss.start, c.loss.end = 0, 4  # the authors' default window
  c.loss.weight = common.prsl_start_weight(c.batch_size)
  c.total_steps = 10_000
  c.log_every = 50
  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.eval.num_examples = 1000
  c.eval.batch_size = 256
  c.eval.eps = (1 / 255, 4 / 255)
  c.eval.suites = ("paper", "pgd-ce", "apgd-ce,apgd-t")
  c.eval.steps = 0  # each attack's default: 100 (APGD-T: per target), BIM 10
  c.eval.num_targets = 0  # AutoAttack's 9
  if "runlocal" in flags:
    common.runlocal(c)
  return c
