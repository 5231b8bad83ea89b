r"""Makes a tiny BLIP-2 (OPT) that captions the digits and answers questions about them.

The result is a HuggingFace Blip2ForConditionalGeneration checkpoint
(config.json, model.safetensors, a GPT-2-style tokenizer with an '<image>'
token, preprocessor_config.json) in prsl_jax/assets/tiny_blip2, loaded through
the same prsl_jax.load_pretrained path as Salesforce/blip2-opt-2.7b. It is
trained from random init, teacher-forced cross-entropy on the target tokens
only (prompt, image placeholders and padding are ignore_index, as the authors
trained BLIP-2), on two tasks mixed half and half:

  captioning  [image] * Q, bos -> "a handwritten three" (prsl_jax.data's
              DIGIT_CAPTIONS with the class name), EOS
  VQA         [image] * Q, bos, "Question: what digit is this? Answer:"
              (one of QUESTIONS) -> " three", EOS

Seeded (init and data order). Run it from the repository root:

  python -m scripts.pretrain_tiny_blip2 [--out prsl_jax/assets/tiny_blip2] [--steps 1200]
"""

import os
import shutil
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers

import prsl_jax
from prsl_jax import data
from prsl_jax import losses
from prsl_jax.models import blip2
from prsl_jax.models import blip2_generation
from prsl_jax.models import convert
from prsl_jax.models import tokenizer as tokenizer_lib

TINY_BLIP2 = os.path.join(os.path.dirname(prsl_jax.TINY_CAPTIONER), "tiny_blip2")
_OUT = flags.DEFINE_string("out", TINY_BLIP2, "Output checkpoint folder.")
_STEPS = flags.DEFINE_integer("steps", 1200, "Pretraining steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Init and data seed.")

IMAGE_SIZE, PATCH, WIDTH, QUERIES, POSITIONS, BATCH = 32, 4, 48, 8, 40, 64
IMAGE_TOKEN = "<image>"
# VQA prompts on the digits; the answer is the digit's name.
QUESTIONS = data.DIGIT_QUESTIONS


def tiny_hf_config(vocab_size, eos_id, image_id):
  """A transformers Blip2Config: vision (2 layers), Q-Former (2), OPT (2, pre-LN)."""
  vision = dict(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=WIDTH,
                intermediate_size=4 * WIDTH, num_hidden_layers=2, num_attention_heads=4)
  qformer = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, cross_attention_frequency=1)
  # As OPT: one id (here <|endoftext|>) starts and ends sequences.
  text = transformers.OPTConfig(
      vocab_size=vocab_size, hidden_size=WIDTH, num_hidden_layers=2, ffn_dim=4 * WIDTH,
      num_attention_heads=4, max_position_embeddings=POSITIONS, bos_token_id=eos_id,
      eos_token_id=eos_id, pad_token_id=eos_id)
  return transformers.Blip2Config(vision_config=vision, qformer_config=qformer,
                                  text_config=text.to_dict(), num_query_tokens=QUERIES,
                                  image_token_index=image_id)


def examples(tok, model, source, all_images, rng, idx):
  """A teacher-forced batch: (images, ids, attention_mask, loss_mask), ids of
  length POSITIONS; half captions, half VQA."""
  eos = model.eos_token_id
  head = model.prompt_ids(batch_size=1)[0].tolist()
  rows, masks, targets = [], [], []
  for i in idx:
    name = data.DIGIT_NAMES[source.labels[i]]
    if rng.uniform() < 0.5:
      prompt = []
      target = tok.encode(data.DIGIT_CAPTIONS[rng.integers(len(data.DIGIT_CAPTIONS))]
                          .format(name))
    else:
      prompt = tok.encode(QUESTIONS[rng.integers(len(QUESTIONS))])
      target = tok.encode(" " + name)
    seq = head + prompt + target + [eos]
    pad = POSITIONS - len(seq)
    rows.append(seq + [eos] * pad)
    masks.append([1] * len(seq) + [0] * pad)
    targets.append([0] * (len(head) + len(prompt)) + [1] * (len(target) + 1) + [0] * pad)
  return all_images[idx], np.asarray(rows, np.int32), np.asarray(masks, np.int32), \
      np.asarray(targets, np.int32)


def accuracy(pretrained, params, num=128):
  """(caption keyword accuracy, VQA exact-match accuracy) of greedy answers
  on the first `num` test digits, and a few examples."""
  model, _, tok = pretrained
  source, _ = data.load("digits", "test", image_size=model.image_size)
  idx = np.arange(min(num, len(source)))
  images = np.stack([source[int(i)]["image"] for i in idx])
  names = [data.DIGIT_NAMES[source.labels[i]] for i in idx]

  def decode(out):
    texts = []
    for row in np.asarray(out).tolist():
      row = row[:row.index(model.eos_token_id)] if model.eos_token_id in row else row
      texts.append(tok.decode(row).strip())
    return texts
  captions = decode(blip2_generation.greedy(model, params, images, max_new_tokens=8))
  prompt = model.prompt_ids([tok.encode(QUESTIONS[0])] * len(idx))
  answers = decode(blip2_generation.greedy(model, params, images, prompt, max_new_tokens=4))
  cap_acc = np.mean([n in c.split() for n, c in zip(names, captions)])
  vqa_acc = np.mean([n == a for n, a in zip(names, answers)])
  return float(cap_acc), float(vqa_acc), list(zip(captions[:3], answers[:3]))


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    words = ([t.format(n) for t in data.DIGIT_CAPTIONS for n in data.DIGIT_NAMES]
             + list(QUESTIONS))
    tokenizer_lib.build_gpt2_word_tokenizer(words, tmp, POSITIONS)
    tok = transformers.AutoTokenizer.from_pretrained(tmp)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    config = tiny_hf_config(len(tok), tok.eos_token_id, tok.convert_tokens_to_ids(IMAGE_TOKEN))
    init = convert.from_config(config, key=jax.random.key(_SEED.value), tokenizer=tok)
  model = init.model
  source, _ = data.load("digits", "train", image_size=IMAGE_SIZE)
  all_images = np.stack([source[i]["image"] for i in range(len(source))])  # resized once
  steps = _STEPS.value
  schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-3, min(100, steps // 2), steps)
  opt = optax.adamw(schedule, weight_decay=1e-4)

  @jax.jit
  def update(params, opt_state, images, ids, mask, loss_mask):
    def loss_fn(p):
      logits = model.logits(p, images, ids, mask)
      return losses.mean_cross_entropy(logits, blip2.lm_labels(ids, loss_mask))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params, opt_state = init.params, opt.init(init.params)
  rng = np.random.default_rng(_SEED.value)
  start = time.time()
  for step in range(steps):
    idx = rng.integers(0, len(source), BATCH)
    batch = examples(tok, model, source, all_images, rng, idx)
    params, opt_state, loss = update(params, opt_state, *map(jnp.asarray, batch))
    if step % 100 == 0 or step == steps - 1:
      print(f"step {step}: loss {float(loss):.4f} ({time.time() - start:.0f} s)", flush=True)
  out = _OUT.value
  if os.path.isdir(out):
    shutil.rmtree(out)
  prsl_jax.save_pretrained(model, params, out, tokenizer=tok)
  size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
  cap_acc, vqa_acc, shown = accuracy(prsl_jax.load_pretrained(out), params)
  print(f"wrote {out} ({size / 1e6:.2f} MB); greedy captions name the digit on "
        f"{100 * cap_acc:.1f}% and answers are right on {100 * vqa_acc:.1f}% of 128 test "
        f"images, e.g. {shown}")


if __name__ == "__main__":
  app.run(main)
