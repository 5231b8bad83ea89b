r"""PMG-AFT's protocol (Wang, Zhang, Yuan, Shan, CVPR 2024, arXiv:2401.04350).

From the authors' code (GitHub serendipity1122/Pre-trained-Model-Guided-Fine-
Tuning-for-Zero-Shot-Adversarial-Robustness, PMG_AFT.py, `parse_option` and
`main`): CLIP ViT-B/32's vision tower fine-tuned through the zero-shot head
("This is a photo of a {}"), text frozen, with SGD (lr 5e-5, momentum 0.9, no
weight decay, 1,000 warm-up steps, cosine decay) at batch 256 for 10 epochs, on
adversarial images from PGD-5 with step 1/255 at eps 2/255 (their
--train_eps 2, --train_numsteps 5, --train_stepsize 1); evaluated at eps 1/255
(--test_eps 1) with PGD-10 of step 1/255 and AutoAttack. The loss is CE on the
adversarial image plus KL to the frozen original's and to the clean prediction,
weights 1 and 1, KL summed over the batch (prsl_jax/finetune_losses.py, which
also says where prsl_jax departs: CLIP's scaled logits where their code's are
cosines).

Data. The code's default dataset is CIFAR-100 (the paper fine-tunes on
TinyImageNet, which TFDS does not have); 10 epochs of its 50,000 training
images at batch 256 are 1,960 steps.

The argument picks the row of the study (configs/study_common.py; default
pmg_aft), so TeCoA (adv_ce), FARE (fare) and PRSL train under the same
protocol; ',runlocal' shrinks everything for a quick check. Needs the hub
checkpoint (or a local copy via --config.model.path) and CIFAR-100 prepared for
TFDS (`python -c "from prsl_jax import data; data.prepare('cifar100')"`).

  python train.py --config configs/pmg_aft.py --workdir runs/pmg_aft_b32
  python train.py --config configs/pmg_aft.py:adv_ce --workdir runs/pmg_aft_b32_tecoa
  python train.py --config configs/pmg_aft.py:pmg_aft,runlocal --workdir /tmp/smoke
"""

from configs import base
from configs import common
from configs import study_common

VARIANTS = tuple(study_common.ROWS)
FLAGS = ("runlocal",)


def get_config(arg=None):
  row, flags = common.parse_arg(arg, variants=VARIANTS, flags=FLAGS, default="pmg_aft")
  c = study_common.apply_row(base.base_config(), row)
  c.workdir = f"runs/pmg_aft_b32/{row}"
  c.model.path = "openai/clip-vit-base-patch32"
  c.data.name = "cifar100"
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.templates = "default"  # "This is a photo of a {}"
  c.train_towers = "vision"
  c.adversarial.eps = 2 / 255
  c.adversarial.steps = 5
  c.adversarial.step_size = 1 / 255
  c.adversarial.norm = "linf"
  c.optimizer.name = "sgd"
  c.optimizer.lr = 5e-5
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 0.0
  c.optimizer.warmup_steps = 1000
  c.optimizer.schedule = "cosine"
  c.optimizer.grad_clip = 0.0  # theirs clips nothing
  c.batch_size = 256
  c.total_steps = 1960  # 10 epochs of CIFAR-100's 50,000 training images
  c.log_every = 50
  c.eval_every = 500
  c.checkpoint_every = 500
  c.eval.num_examples = 1000
  c.eval.batch_size = 256
  c.eval.eps = (1 / 255,)
  c.eval.norm = "linf"
  c.eval.suites = ("pgd-ce", "apgd-ce,apgd-t", "paper")
  c.eval.steps = 0  # each attack's default: PGD 100 (theirs: 10), APGD 100, BIM 10
  c.eval.num_targets = 0  # AutoAttack's 9
  if "runlocal" in flags:
    common.runlocal(c)
  return c
