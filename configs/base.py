"""Fields every training config has; experiment files import and override these.

An unknown --config.key is an error (the ConfigDict is locked by config_flags).
`python train.py [--config FILE] --config.help` lists every field of a config with
its value and its meaning (FIELD_HELP).
"""

import ml_collections

import prsl_jax


def base_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = "runs/default"

  # A checkpoint folder (HF, or open_clip) or a hub id (when online);
  # vision_weights: optional file of a vision tower (open_clip, OpenAI or HF
  # names) put on that base CLIP (README, "Models").
  c.model = ml_collections.ConfigDict(dict(
      path=prsl_jax.TINY_CLIP, dtype="float32", remat=False, allow_pickle=False,
      vision_weights=""))
  # templates: 'default' ("This is a photo of a {}") or 'imagenet' prompts;
  # caption_length: tokens of a training caption incl. its EOS (captioning).
  c.data = ml_collections.ConfigDict(dict(
      name="digits", train_split="train", eval_split="test", data_dir="",
      templates="default", caption_length=16, questions=False))

  # 'classification' (zero-shot head), 'contrastive' (image-caption pairs) or
  # 'captioning' (teacher-forced caption tokens).
  c.objective = "classification"
  # The loss (prsl_jax.losses.get_loss). 'prsl' is the authors' PRSL:
  #   ce_weight * CE + weight * x, x = n logsumexp(m) - sum(m), m_i the mean of
  #   row i's wrong-class logits ranked start..end-1, the rows of a group.
  # group_size 0: the global batch is one group; G: groups of G rows (averaged).
  # 'drsl': the authors' DRSL (weight, ce_weight). The field's methods (need
  # adversarial.enabled; read none of these fields): 'fare' (FARE's embedding loss
  # to the frozen original), 'pmg_aft' (PMG-AFT); TeCoA is 'ce' with
  # adversarial.enabled (README, "FARE, PMG-AFT and TeCoA"). Ours, ablations:
  # 'topk_variance' (k, weight, renormalize), 'topk_ce' (k). 'ce': cross-entropy.
  # k and renormalize are read by those two ablations only (train.py refuses an
  # override of a field no loss of the run reads: trainer.check_loss_overrides).
  # weight 1e-3 is the authors' class default. On the bundled tiny CLIP and 64
  # training digits, the parameter gradient of x at weight 1 is ~5.6e4 times the
  # cross-entropy's at the start (1e4 at 16 rows, 3.3e5 at 256: x sums over the
  # rows), so here PRSL's term leads CE's by ~50x. Other models and batch sizes
  # need their own measurement (docs/design.md section 1; configs/common.py).
  c.loss = ml_collections.ConfigDict(dict(
      name="prsl", start=0, end=4, weight=1e-3, ce_weight=1.0, group_size=0,
      k=3, renormalize=False))
  # Extra losses trained from the same start and reported beside the main one.
  c.compare_losses = ("ce",)
  c.train_towers = "vision"  # 'vision' (text frozen), 'text' or 'both'

  # TeCoA-style adversarial fine-tuning: PGD examples made at every step.
  c.adversarial = ml_collections.ConfigDict(dict(
      enabled=False, eps=1 / 255, steps=2, step_size=0.0, norm="linf", loss="ce"))

  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-4, weight_decay=0.0, momentum=0.9, schedule="cosine",
      warmup_steps=10, grad_clip=1.0))
  c.batch_size = 64  # global, over all devices and hosts
  c.total_steps = 100
  c.log_every = 10
  c.eval_every = 50  # clean accuracy on the eval subset, in metrics.jsonl; 0 = off
  c.checkpoint_every = 50
  c.keep_checkpoints = 3
  c.export = True  # write the fine-tuned model with prsl_jax.save_pretrained

  # End-of-run robustness table: the starting model vs each fine-tuned one. Each
  # entry of `suites` is its own cascade: a suite name (standard, fast, pgd,
  # paper) or comma-separated attacks. 'paper' attacks each model through its
  # own training loss (BIM-10). steps / queries / num_targets: 0 = the attack's
  # default (AutoAttack: 100 steps, 5000 queries, 9 targets; BIM: 10 steps).
  c.eval = ml_collections.ConfigDict(dict(
      num_examples=256, batch_size=64, eps=(1 / 255, 2 / 255), norm="linf",
      suites=("paper", "pgd-ce", "apgd-ce,apgd-t"), steps=10, queries=0, num_targets=3,
      seed=0, max_length=0, target_caption="", prompt=""))  # captioning: length, target, question
  return c


# One line per field, for `train.py --config.help` (an experiment file's extra
# fields are listed without one).
FIELD_HELP = {
    "seed": "seed of the init, the data order and the attacks",
    "workdir": "output folder (train.py --workdir wins)",
    "model.path": "checkpoint: an HF or open_clip folder, or a hub id",
    "model.dtype": "compute dtype (float32, bfloat16); params stay float32",
    "model.remat": "recompute activations in the backward pass (less memory)",
    "model.allow_pickle": "accept pytorch_model.bin (a pickle can run code)",
    "model.vision_weights": "file of a vision tower put on the base CLIP ('' = none)",
    "data.name": "'digits' (embedded) or a TFDS dataset prepared as ArrayRecord",
    "data.train_split": "split to fine-tune on",
    "data.eval_split": "split of the evaluation subset",
    "data.data_dir": "TFDS data folder ('' = TFDS's default)",
    "data.templates": "prompts: 'default' or CLIP's 80 'imagenet' templates",
    "data.caption_length": "tokens of a training caption incl. its EOS (captioning)",
    "data.questions": "digits captioning: also train on question + answer texts (VQA)",
    "objective": "classification (zero-shot head), contrastive or captioning",
    "loss.name": "prsl (the authors'), drsl, ce, fare, pmg_aft, or the ablations "
                 "topk_variance, topk_ce",
    "loss.start": "PRSL: first wrong-class rank of the window",
    "loss.end": "PRSL: end (exclusive) of the window of ranks",
    "loss.weight": "b: weight of PRSL's x (or DRSL's / the ablation's term)",
    "loss.ce_weight": "a: weight of the cross-entropy term",
    "loss.group_size": "rows per PRSL group; 0 = the global batch",
    "loss.k": "topk_variance / topk_ce: wrong classes kept",
    "loss.renormalize": "topk_variance: renormalise the kept probabilities",
    "compare_losses": "losses trained from the same start and reported beside the main one",
    "train_towers": "vision (text frozen), text or both",
    "adversarial.enabled": "train on PGD images made at every step (TeCoA-style)",
    "adversarial.eps": "budget of the training attack, on [0, 1] pixels",
    "adversarial.steps": "PGD steps of the training attack",
    "adversarial.step_size": "PGD step size (0 = 2.5 eps / steps)",
    "adversarial.norm": "linf or l2",
    "adversarial.loss": "objective of the training attack (a loss name)",
    "optimizer.name": "adamw or sgd",
    "optimizer.lr": "peak learning rate",
    "optimizer.weight_decay": "decoupled weight decay",
    "optimizer.momentum": "sgd momentum",
    "optimizer.schedule": "learning-rate schedule: cosine or constant",
    "optimizer.warmup_steps": "linear warm-up steps",
    "optimizer.grad_clip": "global gradient-norm clip (0 = off)",
    "batch_size": "global batch, over all devices and hosts",
    "total_steps": "training steps of each loss",
    "log_every": "steps between metrics.jsonl lines",
    "eval_every": "steps between clean-accuracy checks (0 = off)",
    "checkpoint_every": "steps between checkpoints",
    "keep_checkpoints": "checkpoints kept per loss",
    "export": "write each fine-tuned model as an HF folder (export/)",
    "eval.num_examples": "size of the seeded evaluation subset (0 = the whole split)",
    "eval.batch_size": "examples per attack call",
    "eval.eps": "budgets on [0, 1] pixels",
    "eval.norm": "linf or l2",
    "eval.suites": "cascades: standard, fast, pgd, paper or comma-separated attacks",
    "eval.steps": "attack iterations (0 = each attack's default)",
    "eval.queries": "Square's queries (0 = 5000)",
    "eval.num_targets": "targets of APGD-T and FAB-T (0 = 9)",
    "eval.seed": "seed of the subset and the attacks",
    "eval.max_length": "captioning: generation length (0 = the model's)",
    "eval.target_caption": "captioning: also attack toward this caption ('' = off)",
    "eval.prompt": "captioning: ask every image this question, score answers ('' = captions)",
}
