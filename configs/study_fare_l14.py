r"""The PRSL study (issue 7) at full scale, FARE's protocol: CLIP ViT-L/14 on ImageNet, eps 2/255 or 4/255.

FARE (Schlarmann et al., ICML 2024, arXiv:2402.12336) fine-tunes CLIP ViT-L/14's
vision tower on ImageNet for 2 epochs: 20,000 steps at batch 128, AdamW (lr 1e-5,
weight decay 1e-4, 1,400 warmup steps), adversarial images from PGD-10 with step
1/255 at eps 2/255 or 4/255, and evaluates zero-shot robustness with AutoAttack's
APGD-CE + APGD-T (100 iterations) at eps 2/255 and 4/255. FARE's own loss is
unsupervised (the embedding distance to the original CLIP), which prsl_jax does
not implement: this config keeps FARE's protocol (model, data, schedule, attack,
budgets) and trains the study's supervised rows, so adv_ce is FARE's TeCoA^eps
baseline and adv_prsl its PRSL counterpart.

The argument picks the row (configs/study_common.py): ce, prsl_k1, prsl_k3_w1e4,
prsl_k5_w1e4, prsl_k9_w1e4, prsl_k3_w1e5, prsl_k5_w1e5, prsl_k9_w1e5,
prsl_renorm_k3_w10, topk_ce_k3, adv_ce, adv_prsl; then flags: ',eps4' trains at
4/255 (default 2/255), ',runlocal' shrinks everything for a quick check. The PRSL
weights were chosen for the tiny CLIP on the digits: measure R_K's scale on
ViT-L/14 first (scripts/prsl_study.py's loss_scales) and override
--config.loss.weight if needed.

Needs openai/clip-vit-large-patch14 and imagenet2012 prepared for TFDS. One command
per row (the run folder is <workdir>/<loss>, loss = ce, prsl or topk_ce); on a TPU
pod add --coordinator_address=auto on every host (see configs/imagenet_tpu_pod.py):

  python train.py --config configs/study_fare_l14.py:adv_prsl,eps4 \
      --config.data.data_dir=~/tensorflow_datasets

Zero-shot robustness (FARE: APGD-CE + APGD-T, 100 iterations, 1000 images per
dataset; the 'fast' suite), and PGD-CE for the comparison of the study:

  ROW=adv_prsl_eps4 LOSS=prsl
  for DS in cifar10:test cifar100:test stl10:test caltech101:test \
            oxford_iiit_pet:test oxford_flowers102:test food101:validation dtd:test \
            eurosat:train sun397:test cars196:test patch_camelyon:test \
            imagenet2012:validation; do
    for SUITE in fast pgd-ce; do
      python evaluate.py \
          --checkpoint runs/study_fare_l14/$ROW/$LOSS,openai/clip-vit-large-patch14 \
          --dataset ${DS%%:*} --split ${DS##*:} --data_dir ~/tensorflow_datasets \
          --eps 2/255,4/255 --suite $SUITE --steps 100 --num_examples 1000 \
          --batch_size 128 --outdir runs/study_fare_l14/$ROW/zeroshot/${DS%%:*}_$SUITE
    done
  done
"""

from configs import base
from configs import study_common


def get_config(arg="adv_prsl"):
  row, *flags = (arg or "adv_prsl").split(",")
  unknown = set(flags) - {"eps4", "runlocal"}
  if unknown:
    raise ValueError(f"unknown flags {sorted(unknown)}; use eps4 and/or runlocal")
  c = study_common.apply_row(base.base_config(), row)
  eps = 4 if "eps4" in flags else 2
  c.workdir = f"runs/study_fare_l14/{row}_eps{eps}" if c.adversarial.enabled else \
      f"runs/study_fare_l14/{row}"
  c.model.path = "openai/clip-vit-large-patch14"
  c.model.dtype = "bfloat16"  # compute dtype; params and attack gradients stay float32
  c.model.remat = True
  c.data.name = "imagenet2012"
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.templates = "default"
  c.train_towers = "vision"
  c.adversarial.eps = eps / 255
  c.adversarial.steps = 10
  c.adversarial.step_size = 1 / 255
  c.optimizer.name = "adamw"
  c.optimizer.lr = 1e-5
  c.optimizer.weight_decay = 1e-4
  c.optimizer.warmup_steps = 1400
  c.optimizer.schedule = "cosine"
  c.batch_size = 128
  c.total_steps = 20_000
  c.log_every = 100
  c.eval_every = 2000
  c.checkpoint_every = 1000
  c.eval.num_examples = 1000
  c.eval.batch_size = 128
  c.eval.eps = (2 / 255, 4 / 255)
  c.eval.attacks = ("apgd-ce", "apgd-t")
  c.eval.steps = 100
  if "runlocal" in flags:
    c.batch_size, c.total_steps, c.eval.num_examples, c.eval.steps = 8, 4, 16, 2
    c.eval.batch_size = 8
    c.optimizer.warmup_steps = 1
    c.log_every = c.eval_every = c.checkpoint_every = 2
  return c
