r"""The PRSL study at full scale, FARE's protocol: CLIP ViT-L/14 on ImageNet, eps 2/255 or 4/255.

FARE (Schlarmann et al., ICML 2024, arXiv:2402.12336) fine-tunes CLIP ViT-L/14's
vision tower on ImageNet for 2 epochs: 20,000 steps at batch 128, AdamW (lr 1e-5,
weight decay 1e-4, 1,400 warmup steps, cosine decay), adversarial images from
PGD-10 with step 1/255 at eps 2/255 or 4/255; it evaluates ImageNet on 5,000
validation images and other zero-shot datasets on 1,000 with AutoAttack's APGD-CE +
APGD-T (100 iterations, 9 targets) at eps 2/255 and 4/255. This config keeps
FARE's protocol (model, data, schedule, attack, budgets) for every row of the
study: fare is FARE itself (its unsupervised embedding loss to the frozen
original CLIP, PGD-10 of step 1/255 maximising it), adv_ce FARE's TeCoA^eps
baseline (TeCoA: adversarial CE), pmg_aft PMG-AFT at FARE's budget and
adv_prsl_0_4_b1e-1 the PRSL counterpart.

FARE's fields are set by configs/fare.py's `apply`, the same function
configs/imagenet_tpu_pod.py uses (tests/test_configs.py checks they agree).

The argument picks the row (configs/study_common.py: ce; prsl_<start>_<end>_b<weight>
over the windows 0:4, 0:6, 0:9, 4:9; prsl_0_4_b1e-3_g8; drsl_b1e-6, drsl_b1e-5;
ours_var_k3_w1e5; adv_ce, fare, pmg_aft, adv_prsl_0_4_b1e-1); then flags: ',eps4' trains and runs
at 4/255 (default 2/255), ',runlocal' shrinks everything for a quick check. The
weights were chosen from the gradient ratio measured on the tiny CLIP on the
digits at batch 32; on ViT-L/14 at batch 128 the same b gives another share
(PRSL's x sums over rows; the model is far less confident): measure it first
(scripts/prsl_study.py: gradient_ratios) and override --config.loss.weight.

Needs openai/clip-vit-large-patch14 and imagenet2012 prepared for TFDS. One command
per row (the run folder is <workdir>/<loss>, loss = ce, prsl, drsl, fare,
pmg_aft or topk_variance, our ablation); on a TPU pod add
--coordinator_address=auto on every host (see configs/imagenet_tpu_pod.py):

  python train.py --config configs/study_fare_l14.py:adv_prsl_0_4_b1e-1,eps4 \
      --config.data.data_dir=~/tensorflow_datasets
  python train.py --config configs/study_fare_l14.py:fare,eps4      # FARE^4 itself
  python train.py --config configs/study_fare_l14.py:prsl_0_4_b1e-5,runlocal

Zero-shot robustness (FARE: APGD-CE + APGD-T, 100 iterations, 1,000 images per
dataset: the 'fast' suite), the paper's BIM-10 through the row's own loss, and
PGD-CE:

  ROW=adv_prsl_0_4_b1e-1_eps4 LOSS=prsl
  for DS in cifar10:test cifar100:test stl10:test caltech101:test \
            oxford_iiit_pet:test oxford_flowers102:test food101:validation dtd:test \
            eurosat:train sun397:test cars196:test patch_camelyon:test \
            imagenet2012:validation; do
    python evaluate.py --checkpoint runs/study_fare_l14/$ROW/$LOSS \
        --dataset ${DS%%:*} --split ${DS##*:} --data_dir ~/tensorflow_datasets \
        --eps 2/255,4/255 --suite fast --suite paper --suite pgd-ce \
        --num_examples 1000 --batch_size 128 \
        --outdir runs/study_fare_l14/$ROW/zeroshot/${DS%%:*}
  done
"""

from configs import base
from configs import common
from configs import fare
from configs import study_common

VARIANTS = tuple(study_common.ROWS)
FLAGS = ("eps4", "runlocal")


def get_config(arg=None):
  row, flags = common.parse_arg(arg, variants=VARIANTS, flags=FLAGS,
                                default="adv_prsl_0_4_b1e-1")
  c = study_common.apply_row(base.base_config(), row)
  eps = 4 if "eps4" in flags else 2
  c.workdir = (f"runs/study_fare_l14/{row}_eps{eps}" if c.adversarial.enabled
               else f"runs/study_fare_l14/{row}")
  fare.apply(c, eps=eps / 255)  # FARE's protocol (configs/fare.py)
  # Not FARE's protocol: logging and checkpoints.
  c.log_every = 100
  c.eval_every = 2000
  c.checkpoint_every = 1000
  if "runlocal" in flags:
    common.runlocal(c)
  return c
