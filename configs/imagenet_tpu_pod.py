r"""PRSL fine-tuning of CLIP ViT-L/14 on ImageNet on a TPU pod, in FARE's setting.

The protocol (model, data, schedule, PGD-10 training attack, evaluation) is
FARE's, set by configs/fare.py's `apply`, the same function configs/
study_fare_l14.py's rows use, so the two agree on every FARE field. This file
adds the loss and the pod launch.

Every host runs the same command; JAX finds the pod's coordinator itself
(--coordinator_address=auto), each host reads its own shard of imagenet2012 from
TFDS (prepared on a shared bucket: --config.data.data_dir=gs://...), and FARE's
global batch of 128 is split over all chips (it must divide by their number: up
to 128 chips; a larger batch is no longer FARE's protocol).

Variants: 'prsl' (clean images) or 'adv_prsl' (PGD-10 images, step 1/255, at
2/255); flags: ',eps4' trains at 4/255 (FARE^4), ',runlocal' shrinks the run
(configs/common.py).

PRSL's weight. The authors' b (1e-5 for ViT-GPT2, 1e-6 for BLIP-2) was tuned for
groups of 8 captions x 128 token rows; the spread term sums over the rows, so
its gradient grows with the group. The starting value keeps the authors' b * rows:
1e-2 / 128 = 8e-5 for the global batch of 128 (configs/common.py's
prsl_start_weight). It is a start, not a tuned value: measure the ratio of the
PRSL and CE gradients on ViT-L/14 first (scripts/prsl_study.py does) and set
--config.loss.weight from it.

  gcloud compute tpus tpu-vm ssh $TPU --worker=all --command "cd prsl_jax && \
    python train.py --config configs/imagenet_tpu_pod.py:adv_prsl,eps4 \
      --coordinator_address=auto --workdir gs://BUCKET/runs/l14_adv_prsl_eps4 \
      --config.data.data_dir=gs://BUCKET/tfds"
"""

from configs import base
from configs import common
from configs import fare

VARIANTS = ("prsl", "adv_prsl")
FLAGS = ("eps4", "runlocal")


def get_config(arg=None):
  variant, flags = common.parse_arg(arg, variants=VARIANTS, flags=FLAGS)
  eps = 4 if "eps4" in flags else 2
  c = fare.apply(base.base_config(), eps=eps / 255)
  c.workdir = f"runs/imagenet_l14_{variant}" + (f"_eps{eps}" if variant == "adv_prsl" else "")
  c.loss.name = "prsl"
  c.loss.start, c.loss.end = 0, 4  # the authors' default window
  c.loss.weight = common.prsl_start_weight(c.batch_size)
  c.compare_losses = ()
  c.adversarial.enabled = variant == "adv_prsl"
  c.log_every = 100
  c.eval_every = 2000
  c.checkpoint_every = 1000
  if "runlocal" in flags:
    common.runlocal(c)
  return c
