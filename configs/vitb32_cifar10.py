"""CLIP ViT-B/32 fine-tuned on CIFAR-10 through the zero-shot head (TeCoA protocol).

The argument picks the variant: 'prsl' (default), 'ce', 'adv_prsl', 'adv_ce'
(adversarial = PGD-2 examples at eps 1/255 each step, as TeCoA), and ',runlocal'
shrinks everything for a quick check. Needs the hub checkpoint (or a local copy)
and CIFAR-10 prepared for TFDS (`tfds build cifar10`).

  python train.py --config configs/vitb32_cifar10.py:adv_prsl --workdir runs/b32_adv_prsl
  python train.py --config configs/vitb32_cifar10.py:prsl,runlocal
"""

from configs import base


def get_config(arg="prsl"):
  arg = arg or "prsl"
  variant, *flags = arg.split(",")
  if variant not in ("prsl", "ce", "adv_prsl", "adv_ce"):
    raise ValueError(f"variant must be prsl, ce, adv_prsl or adv_ce, got {variant!r}")
  c = base.base_config()
  c.workdir = f"runs/vitb32_cifar10_{variant}"
  c.model.path = "openai/clip-vit-base-patch32"
  c.data.name = "cifar10"
  c.data.eval_split = "test"
  c.loss.name = "ce" if variant.endswith("ce") else "prsl"
  c.loss.k = 3
  c.loss.weight = 10.0
  c.compare_losses = ()
  c.adversarial.enabled = variant.startswith("adv")
  c.adversarial.eps = 1 / 255
  c.adversarial.steps = 2
  c.optimizer.lr = 1e-5
  c.optimizer.weight_decay = 1e-4
  c.optimizer.warmup_steps = 500
  c.batch_size = 256
  c.total_steps = 10_000
  c.log_every = 50
  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.eval.num_examples = 1000
  c.eval.batch_size = 256
  c.eval.eps = (1 / 255, 4 / 255)
  c.eval.steps = 100
  if "runlocal" in flags:
    c.batch_size, c.total_steps, c.eval.num_examples, c.eval.steps = 8, 4, 16, 2
    c.log_every = c.eval_every = c.checkpoint_every = 2
  return c
