"""Captioning, the paper's generative setting: a captioner's teacher-forced token logits.

Batch fields: image, decoder_input_ids (B, T), decoder_attention_mask (B, T),
labels (B, T): the caption's tokens, its EOS, then IGNORE_INDEX (made in the
pipeline from the data's captions). Logits (B, T, V) of model.caption_logits
(a captioner's decoder; BLIP-2's OPT after its image placeholders, which get
no label, so only the caption's tokens are learned); the loss's rows are
tokens, so PRSL's group is every token of the global batch. Evaluation: attacks
on captions (prsl_jax.captioning), L-inf only.
"""

from prsl_jax import captioning
from prsl_jax import data
from prsl_jax import reports
from prsl_jax.tasks.protocol import Task

# What the task calls (the captioner and BLIP-2 both provide them):
# caption_logits(params, images, decoder_input_ids, mask) -> (B, T, V) and
# caption(params, images, max_length) -> greedy tokens (B, max_length).
NEEDS = ("caption_logits", "caption")


def num_classes(config, model, class_names):
  del config, class_names
  return model.vocab_size


def rows_per_example(config):
  return config.data.caption_length


def no_head(config, model, params, tokenizer, class_names, templates):
  del config, model, params, tokenizer, class_names, templates
  return {}


def data_fields(config, model, tokenizer):
  """Caption templates (the digits' own; with data.questions also the digits'
  questions, data.DIGIT_VQA) and their teacher-forcing fields.

  A text holding "Answer:" is a question and its answer: the prompt up to the
  mark is fed but its labels are IGNORE_INDEX, so only the answer's tokens and
  EOS are trained (and attacked), as the authors trained BLIP-2.
  """
  def tokenize(texts):
    labels, prompt = captioning.tokenize_questions(
        tokenizer, texts, length=config.data.caption_length, eos_token_id=model.eos_token_id)
    return captioning.teacher_forcing(model, labels, prompt)
  templates = ()
  if config.data.name == "digits":
    templates = data.DIGIT_CAPTIONS
    if config.data.get("questions"):
      templates += data.DIGIT_VQA
  return {"caption_templates": templates, "tokenize": tokenize}


def logits(params, batch, images, head, *, model, axis_name=None):
  del head, axis_name
  return model.caption_logits(params, images, batch["decoder_input_ids"],
                              batch["decoder_attention_mask"])


def labels(batch, axis_name=None):
  del axis_name
  return batch["labels"]


def make_suite(suite, norm="linf", **settings):
  del norm  # L-inf only (TASK.norms)
  return captioning.make_suite(suite, **settings)


def evaluate(model, params, tokenizer, source, indices, *, class_names, templates, eps_list,
             suites, norm, seed, batch_size, mesh, options=None):
  del class_names, templates, norm
  options = options or {}
  return captioning.evaluate(
      model, params, tokenizer, source, indices, eps_list=eps_list, suites=suites, seed=seed,
      batch_size=batch_size, max_length=options.get("max_length"),
      target_caption=options.get("target_caption"), prompt=options.get("prompt"), mesh=mesh)


TASK = Task(
    name="captioning", needs=NEEDS, num_classes=num_classes,
    rows_per_example=rows_per_example, head=no_head, data_fields=data_fields, logits=logits,
    labels=labels, loss=None, make_suite=make_suite,
    default_suites=captioning.DEFAULT_SUITES, norms=("linf",), needs_class_names=False,
    evaluate=evaluate, track_accuracy=False, title="Captions",
    format_table=reports.format_caption_table, plot=reports.plot_captions)
