"""CLIP's contrastive image-text objective, with any loss of the registry in both
directions; evaluated as zero-shot classification when the data has class names.

Batch fields: image, input_ids (B, L), attention_mask (B, L): one caption per
image, drawn from the data's caption templates and tokenized in the pipeline.
Logits are image -> text over the captions of every device (labels: the global
rows), so the negatives are the global batch and one device equals eight.
"""

import jax
import jax.numpy as jnp

from prsl_jax import data
from prsl_jax import losses
from prsl_jax import zeroshot
from prsl_jax.tasks import classification
from prsl_jax.tasks.protocol import Task


def num_classes(config, model, class_names):
  del model, class_names
  return config.batch_size  # the global batch's captions


def no_head(config, model, params, tokenizer, class_names, templates):
  del config, model, params, tokenizer, class_names, templates
  return {}


def data_fields(config, model, tokenizer):
  """Caption templates (the digits' own) and their CLIP tokenization."""
  def tokenize(texts):
    ids, mask = zeroshot.tokenize(tokenizer, texts, model.max_text_length)
    return {"input_ids": ids, "attention_mask": mask}
  templates = data.DIGIT_CAPTIONS if config.data.name == "digits" else ()
  return {"caption_templates": templates, "tokenize": tokenize}


def _row_offset(batch, axis_name):
  """The global index of this shard's first row."""
  n = batch["image"].shape[0]
  return 0 if axis_name is None else jax.lax.axis_index(axis_name) * n


def logits(params, batch, images, head, *, model, axis_name=None):
  """Image -> text logits (B, B_global) over the captions of every device."""
  del head
  img = losses.l2_normalize(model.encode_images(params, images))
  txt = losses.l2_normalize(model.encode_texts(params, batch["input_ids"],
                                               batch["attention_mask"]))
  if axis_name is not None:
    txt = jax.lax.all_gather(txt, axis_name, tiled=True)
  return model.logit_scale(params) * img @ txt.T


def labels(batch, axis_name=None):
  """(B,) the global rows: row i's caption is its positive."""
  return _row_offset(batch, axis_name) + jnp.arange(batch["image"].shape[0])


def loss(params, batch, images, head, *, model, loss_fn, axis_name=None):
  """losses.contrastive_loss: both directions, negatives from every device."""
  del head
  img = model.encode_images(params, images)
  txt = model.encode_texts(params, batch["input_ids"], batch["attention_mask"])
  return losses.contrastive_loss(img, txt, model.logit_scale(params), loss=loss_fn,
                                 axis_name=axis_name)


_C = classification.TASK
TASK = Task(
    name="contrastive", needs=_C.needs, num_classes=num_classes,
    rows_per_example=classification.one_row, head=no_head, data_fields=data_fields,
    logits=logits, labels=labels, loss=loss, make_suite=_C.make_suite,
    default_suites=_C.default_suites, norms=_C.norms, needs_class_names=True,
    evaluate=_C.evaluate, track_accuracy=False, title=_C.title,
    format_table=_C.format_table, plot=_C.plot)
