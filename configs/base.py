"""Fields every training config has; experiment files import and override these.

An unknown --config.key is an error (the ConfigDict is locked by config_flags).
"""

import os

import ml_collections

import prsl_jax

# The tiny CLIP bundled with the package (scripts/pretrain_tiny_clip.py makes it).
TINY_CLIP = os.path.join(os.path.dirname(prsl_jax.__file__), "assets", "tiny_clip")


def base_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = "runs/default"

  # HF-format CLIP: a local folder or a hub id (when online).
  c.model = ml_collections.ConfigDict(dict(
      path=TINY_CLIP, dtype="float32", remat=False, allow_pickle=False))
  c.data = ml_collections.ConfigDict(dict(
      name="digits", train_split="train", eval_split="test", data_dir="",
      templates="default"))  # 'default' ("This is a photo of a {}") or 'imagenet'

  c.objective = "classification"  # or 'contrastive' (image-caption pairs)
  # renormalize=True: the raw R_K scales with p^2 and vanishes once the model is
  # confident (about 5e-9 at the tiny CLIP's fine-tuned logits), which makes raw
  # PRSL cross-entropy in all but name; the renormalised R_K is scale-free.
  c.loss = ml_collections.ConfigDict(dict(name="prsl", k=3, weight=1.0, renormalize=True))
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

  # End-of-run robustness table: starting model vs each fine-tuned one.
  c.eval = ml_collections.ConfigDict(dict(
      num_examples=256, batch_size=64, eps=(1 / 255, 2 / 255),
      attacks=("pgd-ce", "apgd-dlr"), steps=10, seed=0))
  return c
