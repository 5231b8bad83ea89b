r"""Makes the bundled tiny CLIP: random init, contrastive pretraining on the digits.

The result is a HuggingFace-format checkpoint (config.json, model.safetensors,
tokenizer files) in prsl_jax/assets/tiny_clip, loaded by `python train.py` through
the same prsl_jax.load_pretrained path as any real CLIP. Deterministic from the
seed on CPU; about two minutes on 2 cores.

  python scripts/pretrain_tiny_clip.py [--out prsl_jax/assets/tiny_clip] [--steps 1500]
"""

import os
import shutil
import sys
import tempfile

from absl import app
from absl import flags
import jax
import ml_collections
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train as train_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
import prsl_jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import base  # pylint: disable=g-import-not-at-top,wrong-import-position
from prsl_jax import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from prsl_jax import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from prsl_jax.models import convert  # pylint: disable=g-import-not-at-top,wrong-import-position
from prsl_jax.models import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

_OUT = flags.DEFINE_string("out", base.TINY_CLIP, "Output checkpoint folder.")
_STEPS = flags.DEFINE_integer("steps", 1500, "Contrastive pretraining steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Init and data seed.")

IMAGE_SIZE, PATCH, WIDTH, MAX_TEXT = 32, 4, 64, 16


def tiny_hf_config(vocab_size, tok):
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
  c = base.base_config()
  c.seed = seed
  c.objective = "contrastive"
  c.train_towers = "both"
  c.loss.name = "ce"
  c.compare_losses = ()
  c.optimizer.lr = 1e-3
  c.optimizer.weight_decay = 1e-4
  c.optimizer.warmup_steps = 100
  c.batch_size = 64
  c.total_steps = steps
  c.log_every = 50
  c.checkpoint_every = steps
  c.keep_checkpoints = 1
  return c


def main(argv):
  del argv
  train_lib.quiet_logs()
  # Reproducible bit for bit on CPU: one device, one process.
  mesh = sharding.make_mesh(jax.devices()[:1])
  with tempfile.TemporaryDirectory() as tmp:
    words = [t.format(n) for t in data.DIGIT_CAPTIONS for n in data.DIGIT_NAMES]
    vocab_size = tokenizer_lib.build_word_tokenizer(words, os.path.join(tmp, "tok"), MAX_TEXT)
    tok = transformers.CLIPTokenizerFast.from_pretrained(os.path.join(tmp, "tok"))
    clip = convert.from_config(tiny_hf_config(vocab_size, tok), key=jax.random.key(_SEED.value),
                               tokenizer=tok)
    config = pretrain_config(_STEPS.value, _SEED.value)
    source, _ = data.load("digits", "train", image_size=IMAGE_SIZE)
    params = train_lib.train(config, os.path.join(tmp, "run"), clip, source, None, None, mesh,
                             desc="pretrain tiny CLIP")
    out = _OUT.value
    if os.path.isdir(out):
      shutil.rmtree(out)
    prsl_jax.save_pretrained(clip, params, out)
  size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
  print(f"wrote {out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
  app.run(main)
