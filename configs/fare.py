"""FARE's protocol (Schlarmann et al., ICML 2024, arXiv:2402.12336), in one place.

FARE fine-tunes CLIP ViT-L/14's vision tower on ImageNet for 2 epochs: 20,000
steps at batch 128, AdamW (lr 1e-5, weight decay 1e-4, 1,400 warmup steps,
cosine decay), adversarial images from PGD-10 with step 1/255 at eps 2/255 or
4/255 (FARE^2, FARE^4); its TeCoA baseline trains through the zero-shot head
with the prompt "This is a photo of a {}". On ImageNet it evaluates 5,000
validation images with AutoAttack's APGD-CE + APGD-T (100 iterations, 9
targets) at eps 2/255 and 4/255; its other zero-shot datasets use 1,000 images
each (evaluate.py; see configs/study_fare_l14.py's docstring for the loop).
FARE's ImageNet evaluation prompts with CLIP's 80 ImageNet templates, while the
trainer evaluates with the prompt it trains with: `evaluate.py --templates
imagenet` gives FARE's numbers.

`apply` sets the protocol (model, data, schedule, attack, budgets) and leaves
the loss to the config: with loss 'fare' and adversarial training it is FARE
itself (the unsupervised embedding loss to the frozen original CLIP, its PGD-10
maximising that loss; prsl_jax/finetune_losses.py), with 'ce' FARE's TeCoA^eps
baseline (TeCoA: adversarial CE), with 'prsl' the PRSL counterpart and with
'pmg_aft' PMG-AFT at FARE's budget. configs/study_fare_l14.py has each as a row:

    python train.py --config configs/study_fare_l14.py:fare,eps4   # FARE^4

Every config that claims FARE's setting calls `apply` and overrides none of
FIELDS (tests/test_configs.py checks that they agree):

    c = fare.apply(base.base_config(), eps=4 / 255)
"""

# FARE's two training budgets, in [0, 1] pixel units.
EPS = (2 / 255, 4 / 255)

# The fields `apply` sets: FARE's protocol.
FIELDS = (
    "model.path", "model.dtype", "model.remat",
    "data.name", "data.train_split", "data.eval_split", "data.templates",
    "train_towers",
    "adversarial.eps", "adversarial.steps", "adversarial.step_size", "adversarial.norm",
    "optimizer.name", "optimizer.lr", "optimizer.weight_decay", "optimizer.warmup_steps",
    "optimizer.schedule",
    "batch_size", "total_steps",
    "eval.num_examples", "eval.batch_size", "eval.eps", "eval.norm", "eval.suites",
    "eval.steps", "eval.queries", "eval.num_targets",
)


def apply(c, eps):
  """Sets FARE's protocol on config c (adversarial budget eps); returns c.

  Args:
    c: a config from configs/base.py; its loss and adversarial.enabled are kept.
    eps: the training budget, 2/255 or 4/255 (FARE^2, FARE^4).
  """
  if not any(abs(eps - e) < 1e-9 for e in EPS):
    raise ValueError(f"FARE trains at eps 2/255 or 4/255, got eps={eps!r}")
  c.model.path = "openai/clip-vit-large-patch14"
  c.model.dtype = "bfloat16"  # compute dtype; params and attack gradients stay float32
  c.model.remat = True  # ViT-L/14 at 224 px under PGD-10: memory over compute
  c.data.name = "imagenet2012"
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.templates = "default"  # "This is a photo of a {}", the field's (TeCoA's) prompt
  c.train_towers = "vision"
  c.adversarial.eps = eps
  c.adversarial.steps = 10
  c.adversarial.step_size = 1 / 255
  c.adversarial.norm = "linf"
  c.optimizer.name = "adamw"
  c.optimizer.lr = 1e-5
  c.optimizer.weight_decay = 1e-4
  c.optimizer.warmup_steps = 1400
  c.optimizer.schedule = "cosine"
  c.batch_size = 128  # global: 2 epochs of ImageNet's 1.28M images in 20k steps
  c.total_steps = 20_000
  c.eval.num_examples = 5000  # FARE's ImageNet subset
  c.eval.batch_size = 128
  c.eval.eps = (2 / 255, 4 / 255)
  c.eval.norm = "linf"
  # FARE's cascade, and the paper's BIM-10 through each model's own training loss
  # (10 steps: cheap beside APGD-T's 9 x 100).
  c.eval.suites = ("apgd-ce,apgd-t", "paper")
  c.eval.steps = 0  # each attack's default: APGD 100 (per target), BIM 10
  c.eval.queries = 0
  c.eval.num_targets = 0  # AutoAttack's 9
  return c
