"""Zero-shot classification: image logits against the class names' text embeddings.

Train step: logits (B, C) = scale x cos(image, class) (prsl_jax.zeroshot), labels
the dataset's classes (batch fields: image, label). With the text tower frozen
the class embeddings are computed once (head {"class_emb": (C, D)}); with it
training, from the prompts inside the step (head {"prompt_ids", "prompt_mask":
(C, templates, L)}). Evaluation: AutoAttack's cascades (prsl_jax.evaluation).
"""

from prsl_jax import evaluation
from prsl_jax import reports
from prsl_jax import zeroshot
from prsl_jax.tasks.protocol import Task

# What every CLIP-like model family provides (models/__init__.py).
NEEDS = ("encode_images", "encode_texts", "logit_scale")


def num_classes(config, model, class_names):
  del model
  if not class_names:
    raise ValueError(f"dataset {config.data.name!r} has no class names to classify")
  return len(class_names)


def one_row(config):
  del config
  return 1


def head(config, model, params, tokenizer, class_names, templates):
  """{"class_emb"} (text frozen) or the tokenized prompts (text trained)."""
  if config.train_towers == "vision":
    return {"class_emb": zeroshot.class_embeddings(model, params, tokenizer, class_names,
                                                   templates)}
  ids, mask = zeroshot.tokenize(tokenizer, zeroshot.prompts(class_names, templates),
                                model.max_text_length)
  shape = (len(class_names), len(templates), -1)
  return {"prompt_ids": ids.reshape(shape), "prompt_mask": mask.reshape(shape)}


def no_fields(config, model, tokenizer):
  del config, model, tokenizer
  return {}


def class_embeddings(model, params, head):  # pylint: disable=redefined-outer-name
  """(C, D) class embeddings: fixed (text frozen) or recomputed from the prompts."""
  if "class_emb" in head:
    return head["class_emb"]
  ids, mask = head["prompt_ids"], head["prompt_mask"]  # (C, T, L): C classes, T templates
  return zeroshot.embed_prompts(model, params, ids.reshape(-1, ids.shape[-1]),
                                mask.reshape(-1, mask.shape[-1]), ids.shape[0])


def logits(params, batch, images, head, *, model, axis_name=None):  # pylint: disable=redefined-outer-name
  del batch, axis_name
  return zeroshot.logits(model, params, class_embeddings(model, params, head), images)


def labels(batch, axis_name=None):
  del axis_name
  return batch["label"]


def evaluate(model, params, tokenizer, source, indices, *, class_names, templates, eps_list,
             suites, norm, seed, batch_size, mesh, options=None):
  """evaluation.evaluate of the zero-shot classifier with this model's own class
  embeddings (the text tower may have trained).

  options["pad_classes"]: K >= C pads the class embeddings to K masked columns
  (zeroshot.pad_classes), so every dataset of a run padded to the same K shares
  the compiled attacks; None: C columns. The attacks run at every halving of
  batch_size (evaluation.bucket_sizes(buckets=None)).
  """
  pad = (options or {}).get("pad_classes")
  class_emb = zeroshot.class_embeddings(model, params, tokenizer, class_names, templates)
  variables = {"params": params, "class_emb": class_emb}
  if pad:
    variables.update(zeroshot.pad_classes(class_emb, pad))
  # Classifier(model) is equal for equal configs: checkpoints share compilations.
  return evaluation.evaluate(
      zeroshot.Classifier(model), variables, source, indices, eps_list=eps_list,
      suites=suites, norm=norm, seed=seed, batch_size=batch_size, mesh=mesh, buckets=None,
      num_classes=len(class_names) if pad else None)


TASK = Task(
    name="classification", needs=NEEDS, num_classes=num_classes, rows_per_example=one_row,
    head=head, data_fields=no_fields, logits=logits, labels=labels, loss=None,
    make_suite=evaluation.make_suite, default_suites=("standard",), norms=("linf", "l2"),
    needs_class_names=True, evaluate=evaluate, track_accuracy=True,
    title="Zero-shot accuracy (%)", format_table=reports.format_table, plot=reports.plot)
