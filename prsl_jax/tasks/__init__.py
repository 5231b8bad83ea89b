"""Tasks as values: what a training objective and its evaluation need, one module each.

    task = tasks.get(config.objective)            # the trainer, once
    task = tasks.for_model(convert.model_class(t)) # the evaluator, once, from the checkpoint

A task is a `Task`, a frozen dataclass of plain functions (hashable, so the
train step can close over it and the step cache can key on it). Tasks take
plain arguments (model, params, arrays, configs), never the trainer's Setup, and
import nothing of the trainer or the evaluator, so no import circle can close.

  classification  zero-shot classification: image logits against class embeddings
  contrastive     CLIP's image-text loss; evaluated as zero-shot classification
  captioning      the paper's generative setting: token logits of a captioner

Adding a task: its module here (one `TASK = Task(...)`) and one entry in TASKS.
A model family says which task evaluate.py measures it with (`model.task`) and
fits a task when it has the methods the task `needs`.
"""

from prsl_jax.tasks import captioning
from prsl_jax.tasks import classification
from prsl_jax.tasks import contrastive
from prsl_jax.tasks.protocol import Task

__all__ = ["Task", "TASKS", "get", "for_model", "check_fits"]

TASKS = {
    "classification": classification.TASK,
    "contrastive": contrastive.TASK,
    "captioning": captioning.TASK,
}


def get(name: str) -> Task:
  """The task called `name` (config.objective)."""
  if name not in TASKS:
    raise ValueError(f"config.objective must be one of {tuple(TASKS)}, got {name!r}")
  return TASKS[name]


def for_model(model) -> Task:
  """The task evaluate.py measures a model (or static model class) with: model.task."""
  return get(model.task)


def check_fits(task: Task, model, what: str):
  """Raises unless the model (or its class) has every method the task needs.

  what: how the error names the model, e.g. "the clip checkpoint runs/x".
  """
  missing = [name for name in task.needs if not hasattr(model, name)]
  if missing:
    fitting = [n for n, t in TASKS.items() if all(hasattr(model, m) for m in t.needs)]
    raise ValueError(f"config.objective={task.name!r} does not fit {what}: the task needs a "
                     f"model with {missing}; this model fits {fitting}")
