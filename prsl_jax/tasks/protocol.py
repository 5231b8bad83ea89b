"""The task protocol: one frozen dataclass of functions (prsl_jax/tasks/__init__.py)."""

import dataclasses
from typing import Callable, Optional


@dataclasses.dataclass(frozen=True)
class Task:
  """What a task provides. B batch rows, C classes, T tokens, V vocabulary.

  Setup (before training; config is the run's ConfigDict):
    name: config.objective.
    needs: the methods the static model must have (e.g. encode_images).
    num_classes(config, model, class_names) -> int: the columns the loss's rows
      range over (checks PRSL's window); raises when the data cannot serve.
    rows_per_example(config) -> int: loss rows per example (a caption's tokens).
    head(config, model, params, tokenizer, class_names, templates) -> dict of
      arrays, replicated, passed to every step ({} when the task has none).
    data_fields(config, model, tokenizer) -> keyword arguments of
      data.train_iterator (caption templates and their tokenizer), {} for none.
  A train step (per shard; axis_name is the mesh axis or None):
    logits(params, batch, images, head, *, model, axis_name) -> (B, C) or
      (B, T, V): the logits the loss and the training attack score.
    labels(batch, axis_name) -> (B,) or (B, T) int, IGNORE_INDEX on padding.
    loss(params, batch, images, head, *, model, loss_fn, axis_name) -> scalar,
      or None: loss_fn(logits, labels, axis_name=axis_name).
  Evaluation:
    make_suite(suite, norm, **settings) -> tuple of evaluation.Attack, where
      suite is a suite name, an attack name or a list of attack names and
      settings are evaluation.make_suite's (steps, queries, num_targets,
      train_loss).
    default_suites: evaluate.py's suites when --suite is not given.
    norms: the threat models it supports.
    needs_class_names: its evaluation needs the dataset's class names.
    evaluate(model, params, tokenizer, source, indices, *, class_names,
      templates, eps_list, suites, norm, seed, batch_size, mesh, options) ->
      a result with to_dict() and checks.passed; options: {max_length,
      target_caption} (captioning's; None when not set).
    track_accuracy: the trainer logs clean accuracy every config.eval_every steps.
    title: the first words of results.md's title, e.g. "Captions".
    format_table(results by row) -> markdown; plot(results by row, path).
  """
  name: str
  needs: tuple
  num_classes: Callable
  rows_per_example: Callable
  head: Callable
  data_fields: Callable
  logits: Callable
  labels: Callable
  loss: Optional[Callable]
  make_suite: Callable
  default_suites: tuple
  norms: tuple
  needs_class_names: bool
  evaluate: Callable
  track_accuracy: bool
  title: str
  format_table: Callable
  plot: Callable
