"""Zero-shot classification head: class names x prompt templates -> logits.

Each class is the average of its prompts' normalised text embeddings,
renormalised (CLIP's prompt ensembling); logits = scale * cos(image, class).

    model, params, tokenizer = prsl_jax.load_pretrained(prsl_jax.TINY_CLIP)
    class_emb = class_embeddings(model, params, tokenizer, ["zero", "one", ...])
    logits_fn = Classifier(model).bind({"params": params, "class_emb": class_emb})
    # logits_fn(images) -> (B, C): what every attack in prsl_jax.attacks takes.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prsl_jax.losses import l2_normalize

# The prompt of TeCoA, FARE and PMG-AFT.
DEFAULT_TEMPLATES = ("This is a photo of a {}",)

# CLIP's 80 ImageNet templates (openai/CLIP, Prompt_Engineering_for_ImageNet).
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)


def tokenize(tokenizer, texts, max_length):
  """Tokenizes texts, padded/truncated to max_length.

  Returns:
    (input_ids, attention_mask), numpy int32 (N, max_length).
  """
  if tokenizer is None:
    raise ValueError("the checkpoint has no tokenizer files; tokenize the prompts yourself "
                     "and use embed_prompts")
  if isinstance(texts, str):
    texts = [texts]
  enc = tokenizer(list(texts), padding="max_length", truncation=True,
                  max_length=max_length, return_tensors="np")
  ids = np.asarray(enc["input_ids"], np.int32)
  # SigLIP's tokenizer returns no mask (its text tower attends to every position).
  mask = enc.get("attention_mask")
  return ids, (np.ones_like(ids) if mask is None else np.asarray(mask, np.int32))


def _check_groups(num_prompts, num_classes):
  if not isinstance(num_classes, int) or num_classes < 1 or num_prompts % num_classes:
    raise ValueError(f"{num_prompts} prompts do not split into num_classes={num_classes} "
                     "equal groups (rows must be class-major: C x T)")


def _average_templates(emb, num_classes):
  """(C*T, D) class-major prompt embeddings -> (C, D) unit class embeddings."""
  _check_groups(emb.shape[0], num_classes)
  emb = l2_normalize(emb).reshape(num_classes, -1, emb.shape[-1])
  return l2_normalize(emb.mean(axis=1))


def embed_prompts(model, params, input_ids, attention_mask, num_classes):
  """Class embeddings from tokenized prompts; jittable (num_classes static).

  Args:
    model: a prsl_jax CLIP (static).
    params: its params.
    input_ids, attention_mask: (C*T, L) int, class-major (class c's T templates
      are rows c*T .. c*T+T-1).
    num_classes: C.

  Returns:
    (C, D) float32: per-prompt embeddings normalised, averaged over the
    templates of each class, renormalised.
  """
  _check_groups(input_ids.shape[0], num_classes)  # before paying for the encoder
  return _average_templates(model.encode_texts(params, input_ids, attention_mask),
                            num_classes)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _embed_batched(model, params, ids, mask, num_classes, num_texts):
  # ids, mask: (num_batches, batch, L). lax.map runs one batch at a time, so the
  # memory is one batch's, and it compiles once whatever the number of batches.
  # `model` is static and equal by value: checkpoints of one config share this.
  emb = jax.lax.map(lambda b: model.encode_texts(params, b[0], b[1]), (ids, mask))
  emb = emb.reshape(-1, emb.shape[-1])[:num_texts]
  return _average_templates(emb, num_classes)


def prompts(class_names, templates=None):
  """The C x T class-major prompt strings, checked."""
  templates = DEFAULT_TEMPLATES if templates is None else tuple(templates)
  if isinstance(class_names, str) or not len(class_names):
    raise ValueError(f"class_names must be a non-empty sequence of names, got {class_names!r}")
  if not templates or any("{}" not in t for t in templates):
    raise ValueError(f"templates must be non-empty format strings with one '{{}}', "
                     f"got {templates!r}")
  return [t.format(c) for c in class_names for t in templates]


def class_embeddings(model, params, tokenizer, class_names, templates=None, batch_size=256):
  """Zero-shot class embeddings for class_names under templates.

  Args:
    model: a prsl_jax CLIP (static).
    params: its params (only the text side is used).
    tokenizer: the checkpoint's tokenizer (Pretrained.tokenizer).
    class_names: sequence of C names, each formatted into every template.
    templates: sequence of format strings with one "{}"; default
      DEFAULT_TEMPLATES ("This is a photo of a {}").
    batch_size: prompts encoded at a time.

  Returns:
    (C, D) float32, unit-norm rows.
  """
  texts = prompts(class_names, templates)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  ids, mask = tokenize(tokenizer, texts, model.max_text_length)
  n = len(texts)
  bs = min(batch_size, n)
  pad = -n % bs
  # Pad with copies of a real prompt: an all-padding row has no EOS to pool at.
  ids = np.concatenate([ids, np.repeat(ids[:1], pad, axis=0)])
  mask = np.concatenate([mask, np.repeat(mask[:1], pad, axis=0)])
  shape = (-1, bs, ids.shape[-1])
  return _embed_batched(model, params, ids.reshape(shape), mask.reshape(shape),
                        len(class_names), n)


def logits(model, params, class_emb, images):
  """Zero-shot logits, scale * cos(image, class) (+ bias for a model with a
  logit_bias, SigLIP).

  Args:
    model: a prsl_jax CLIP (static).
    params: its params.
    class_emb: (C, D) class embeddings (class_embeddings / embed_prompts).
    images: (B, H, W, 3) float in [0, 1] at model.image_size.

  Returns:
    (B, C) float32.
  """
  img = l2_normalize(model.encode_images(params, images))
  out = model.logit_scale(params) * (img @ l2_normalize(class_emb).T)
  if hasattr(model, "logit_bias"):  # SigLIP: sigmoid scores, scale * cos + bias
    out = out + model.logit_bias(params)
  return out


# The logit of a padded class: far below any real one (|scale x cos| <= 100,
# plus SigLIP's bias), so argmax, the cross-entropy (exp underflows to 0), the
# CW margin, DLR's sorted logits (with C >= 4 real classes) and the targets'
# order never see it, and it is finite, so no NaN reaches a gradient.
PADDED_LOGIT = -1e9


def pad_classes(class_emb, num_classes):
  """(C, D) class embeddings -> variables' {"class_emb": (K, D), "class_mask": (K,)}.

  K = num_classes >= C. The padded rows copy row 0 (a zero row would normalise
  to NaN) and are masked to PADDED_LOGIT by Classifier, so datasets of different
  class counts share one compiled program per attack and batch size.
  """
  c = class_emb.shape[0]
  if num_classes < c:
    raise ValueError(f"cannot pad {c} classes to {num_classes}")
  emb = jnp.concatenate([class_emb, jnp.repeat(class_emb[:1], num_classes - c, axis=0)])
  return {"class_emb": emb, "class_mask": jnp.arange(num_classes) < c}


@dataclasses.dataclass(frozen=True)
class Classifier:
  """The zero-shot classifier under attack: fn(variables, images) -> (B, C) logits.

  A value-hashable callable (its model is static and equal by value), so every
  checkpoint of one architecture shares its compiled attacks, and no params are
  kept alive by a cache. variables = {"params": model params, "class_emb":
  (C, D) class embeddings}, and optionally "class_mask" (C,) bool: the columns
  that are real classes, the others padding (pad_classes).

      classify = Classifier(model)
      variables = {"params": params, "class_emb": class_embeddings(...)}
      logits_fn = classify.bind(variables)     # images -> logits: what attacks take
  """
  model: Any

  def __call__(self, variables, images):
    out = logits(self.model, variables["params"], variables["class_emb"], images)
    mask = variables.get("class_mask")
    if mask is not None:  # padded classes (pad_classes): below every real logit
      out = jnp.where(mask, out, jnp.asarray(PADDED_LOGIT, out.dtype))
    return out

  def bind(self, variables):
    return functools.partial(self, variables)
