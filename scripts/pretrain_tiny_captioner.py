r"""Makes the bundled tiny captioner: a tiny ViT + GPT-2 trained to caption the digits.

The result is a HuggingFace VisionEncoderDecoderModel checkpoint (config.json,
model.safetensors, GPT-2 tokenizer files, preprocessor_config.json) in
prsl_jax/assets/tiny_captioner, loaded by configs/digits_captioning.py through
the same prsl_jax.load_pretrained path as nlpconnect/vit-gpt2-image-captioning.
It is trained from random init on the digits' captions (prsl_jax.data's
DIGIT_CAPTIONS with each image's class name), teacher-forced cross-entropy,
through the library trainer. Deterministic from the seed on CPU. Run it from the
repository root (it reads configs/base.py):

  python -m scripts.pretrain_tiny_captioner [--out prsl_jax/assets/tiny_captioner] \
      [--steps 1500]
"""

import os
import shutil
import tempfile

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np
import transformers

import prsl_jax
from prsl_jax import captioning
from prsl_jax import caption_metrics
from prsl_jax import cli
from prsl_jax import data
from prsl_jax import trainer
from prsl_jax.models import convert
from prsl_jax.models import generation
from prsl_jax.models import tokenizer as tokenizer_lib

_OUT = flags.DEFINE_string("out", prsl_jax.TINY_CAPTIONER, "Output checkpoint folder.")
_STEPS = flags.DEFINE_integer("steps", 1500, "Pretraining steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Init and data seed.")

IMAGE_SIZE, PATCH, WIDTH, POSITIONS = 32, 4, 48, 16


def tiny_hf_config(vocab_size, eos_id):
  """A transformers VisionEncoderDecoderConfig: ViT (2 layers) + GPT-2 (2 layers)."""
  vit = transformers.ViTConfig(
      image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
      num_hidden_layers=2, num_attention_heads=4)
  gpt2 = transformers.GPT2Config(
      vocab_size=vocab_size, n_positions=POSITIONS, n_embd=WIDTH, n_layer=2, n_head=4,
      bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
      add_cross_attention=True, is_decoder=True)
  config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(vit, gpt2)
  # As nlpconnect/vit-gpt2: <|endoftext|> starts, ends and pads captions.
  config.decoder_start_token_id = config.pad_token_id = config.eos_token_id = eos_id
  return config


def pretrain_config(path, steps, seed):
  from configs import base  # pylint: disable=g-import-not-at-top
  c = base.base_config()
  c.seed = seed
  c.model.path = path
  c.objective = "captioning"
  c.train_towers = "both"
  c.loss = ml_collections.ConfigDict(dict(c.loss.to_dict(), name="ce"))
  c.compare_losses = ()
  c.optimizer.lr = 2e-3
  c.optimizer.weight_decay = 1e-4
  c.optimizer.warmup_steps = 100
  c.batch_size = 64
  c.total_steps = steps
  c.log_every = 100
  c.eval_every = 0
  c.checkpoint_every = steps
  c.keep_checkpoints = 1
  c.export = False
  c.eval.suites = captioning.DEFAULT_SUITES
  return c


def keyword_accuracy(pretrained, params, num=128):
  """Fraction of test digits whose greedy caption names the right digit."""
  model, _, tokenizer = pretrained
  source, _ = data.load("digits", "test", image_size=model.image_size)
  idx = np.arange(min(num, len(source)))
  images = np.stack([source[int(i)]["image"] for i in idx])
  captions = captioning.decode(tokenizer, generation.greedy(model, params, images))
  hits = [caption_metrics.tokenize(source.keyword(int(i)))[0] in caption_metrics.tokenize(c)
          for i, c in zip(idx, captions)]
  return float(np.mean(hits)), captions[:3]


def main(argv):
  del argv
  cli.quiet_logs()
  with tempfile.TemporaryDirectory() as tmp:
    words = [t.format(n) for t in data.DIGIT_CAPTIONS for n in data.DIGIT_NAMES]
    vocab_size = tokenizer_lib.build_gpt2_word_tokenizer(words, tmp, POSITIONS)
    tok = transformers.AutoTokenizer.from_pretrained(tmp)
    init = convert.from_config(tiny_hf_config(vocab_size, tok.eos_token_id),
                               key=jax.random.key(_SEED.value), tokenizer=tok)
    init_dir = os.path.join(tmp, "init")
    prsl_jax.save_pretrained(init.model, init.params, init_dir, tokenizer=tok)
    config = pretrain_config(init_dir, _STEPS.value, _SEED.value)
    setup = trainer.setup(config)
    params, _ = trainer.train(config, os.path.join(tmp, "run"), setup,
                              desc="pretrain tiny captioner")
    out = _OUT.value
    if os.path.isdir(out):
      shutil.rmtree(out)
    prsl_jax.save_pretrained(init.model, params, out, tokenizer=tok)
  size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
  acc, examples = keyword_accuracy(prsl_jax.load_pretrained(out), params)
  print(f"wrote {out} ({size / 1e6:.2f} MB); greedy captions name the digit on {100 * acc:.1f}% "
        f"of 128 test images, e.g. {examples}")


if __name__ == "__main__":
  app.run(main)
