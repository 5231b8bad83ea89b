"""ImageNet-scale PRSL fine-tuning of CLIP ViT-L/14 on a TPU pod (FARE's setting).

Every host runs the same command; JAX finds the pod's coordinator itself
(--coordinator_address=auto), each host reads its own shard of imagenet2012 from
TFDS (prepared on a shared bucket: --config.data.data_dir=gs://...), and the
global batch is split over all chips. The argument picks 'prsl' or 'adv_prsl'.

  gcloud compute tpus tpu-vm ssh $TPU --worker=all --command "cd prsl_jax && \
    python train.py --config configs/imagenet_tpu_pod.py:adv_prsl \
      --coordinator_address=auto --workdir gs://BUCKET/runs/l14_adv_prsl \
      --config.data.data_dir=gs://BUCKET/tfds"
"""

from configs import base


def get_config(arg="prsl"):
  arg = arg or "prsl"
  if arg not in ("prsl", "adv_prsl"):
    raise ValueError(f"variant must be prsl or adv_prsl, got {arg!r}")
  c = base.base_config()
  c.workdir = f"runs/imagenet_l14_{arg}"
  c.model.path = "openai/clip-vit-large-patch14"
  c.model.dtype = "bfloat16"  # compute dtype; params and attack gradients stay float32
  c.model.remat = True
  c.data.name = "imagenet2012"
  c.data.eval_split = "validation"
  c.data.templates = "imagenet"
  c.loss.k = 5
  c.loss.weight = 10.0
  c.compare_losses = ()
  c.adversarial.enabled = arg == "adv_prsl"
  c.adversarial.eps = 4 / 255
  c.adversarial.steps = 10
  c.optimizer.lr = 1e-5
  c.optimizer.weight_decay = 1e-4
  c.optimizer.warmup_steps = 1000
  c.batch_size = 1024
  c.total_steps = 20_000
  c.log_every = 100
  c.eval_every = 2000
  c.checkpoint_every = 1000
  c.eval.num_examples = 5000
  c.eval.batch_size = 1024
  c.eval.eps = (2 / 255, 4 / 255)
  c.eval.attacks = ("apgd-ce", "apgd-t")
  c.eval.steps = 100
  return c
