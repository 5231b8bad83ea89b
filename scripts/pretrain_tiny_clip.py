r"""Makes the bundled tiny CLIP: random init, contrastive pretraining on the digits.

The result is a HuggingFace-format checkpoint (config.json, model.safetensors,
preprocessor_config.json, tokenizer files) that `python train.py` loads through
the same prsl_jax.load_pretrained path as any real CLIP; prsl_jax.TINY_CLIP
(prsl_jax/assets/tiny_clip) was made by this script with its defaults. Training
is prsl_jax.trainer.train with the contrastive objective, both towers trained,
cross-entropy, on one device: deterministic from the seed on CPU, about two
minutes on 2 cores. The script ends by loading the written folder and printing
its zero-shot accuracy on the digits test split.

  python -m scripts.pretrain_tiny_clip --out /tmp/tiny_clip              # 1500 steps
  python -m scripts.pretrain_tiny_clip --out /tmp/tiny_clip --steps 20   # a smoke run
  python -m scripts.pretrain_tiny_clip --out prsl_jax/assets/tiny_clip   # remake the asset
"""

import os
import shutil
import tempfile

from absl import app
from absl import flags

import jax
import numpy as np

import prsl_jax
from configs import base
from prsl_jax import cli
from prsl_jax import data
from prsl_jax import sharding
from prsl_jax import trainer
from prsl_jax import zeroshot
from prsl_jax.models import clip as clip_lib
from prsl_jax.models import convert
from prsl_jax.models import tokenizer as tokenizer_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

_OUT = flags.DEFINE_string("out", None, "Output checkpoint folder (replaced if it exists).")
_STEPS = flags.DEFINE_integer("steps", 1500, "Contrastive pretraining steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Init and data seed.")

IMAGE_SIZE, PATCH, WIDTH, MAX_TEXT = 32, 4, 64, 16


def tiny_hf_config(vocab_size, tok):
  """transformers.CLIPConfig of the tiny CLIP: 4 vision layers, 2 text layers, width 64."""
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.CLIPConfig(
      text_config=dict(vocab_size=vocab_size, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                       num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=MAX_TEXT, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       hidden_act="quick_gelu"),
      vision_config=dict(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=WIDTH,
                         intermediate_size=4 * WIDTH, num_hidden_layers=4,
                         num_attention_heads=4, hidden_act="quick_gelu"),
      projection_dim=WIDTH)


def pretrain_config(steps, seed):
  """CLIP's contrastive cross-entropy on digit captions, both towers, from scratch."""
  c = base.base_config()
  c.seed = seed
  c.objective = "contrastive"
  c.train_towers = "both"
  c.loss.name = "ce"
  c.compare_losses = ()
  c.optimizer.lr = 1e-3
  c.optimizer.weight_decay = 1e-4
  c.optimizer.warmup_steps = min(100, max(1, steps // 10))  # 100 for the asset's 1500
  c.batch_size = 64
  c.total_steps = steps
  c.log_every = 50
  c.eval_every = 0  # no zero-shot head while pretraining
  c.checkpoint_every = steps
  c.keep_checkpoints = 1
  return c


def zero_shot_accuracy(folder):
  """Zero-shot accuracy of the checkpoint in `folder` on the digits test split."""
  model, params, tok = prsl_jax.load_pretrained(folder)
  source, names = data.load("digits", "test", image_size=model.image_size)
  class_emb = zeroshot.class_embeddings(model, params, tok, names)
  logits_fn = jax.jit(lambda x: zeroshot.logits(model, params, class_emb, x))
  hits = 0
  for batch in data.eval_batches(source, np.arange(len(source)), 128):
    pred = np.argmax(logits_fn(batch["image"]), axis=-1)
    hits += int(np.sum((pred == batch["label"]) & batch["mask"]))
  return hits / len(source)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _OUT.value:
    raise ValueError("--out is required (prsl_jax/assets/tiny_clip remakes the bundled "
                     "checkpoint)")
  cli.quiet_logs()
  out = os.path.abspath(_OUT.value)
  config = pretrain_config(_STEPS.value, _SEED.value)
  with tempfile.TemporaryDirectory() as tmp:
    words = [t.format(n) for t in data.DIGIT_CAPTIONS for n in data.DIGIT_NAMES]
    vocab_size = tokenizer_lib.build_word_tokenizer(words, os.path.join(tmp, "tok"), MAX_TEXT)
    tok = clip_lib.load_tokenizer(os.path.join(tmp, "tok"))
    pretrained = convert.from_config(tiny_hf_config(vocab_size, tok),
                                     key=jax.random.key(_SEED.value), tokenizer=tok)
    # Reproducible bit for bit on CPU: one device, one process.
    mesh = sharding.make_mesh(jax.devices()[:1])
    source, _ = data.load("digits", "train", image_size=IMAGE_SIZE)
    setup = trainer.Setup(mesh=mesh, pretrained=pretrained, train_source=source,
                          eval_source=None, class_names=None, templates=(), head={})
    params, _ = trainer.train(config, os.path.join(tmp, "run"), setup,
                              desc="pretrain tiny CLIP")
    if os.path.isdir(out):
      shutil.rmtree(out)
    prsl_jax.save_pretrained(pretrained.model, params, out, tokenizer=tok)
  size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
  print(f"wrote {out} ({size / 1e6:.2f} MB); zero-shot accuracy on the digits test split: "
        f"{100 * zero_shot_accuracy(out):.1f}%")


if __name__ == "__main__":
  app.run(lambda argv: cli.run(main, argv))
