"""Greedy and beam-search generation for BLIP-2 (OPT) in JAX, with a key/value cache.

Same conventions as transformers' Blip2ForConditionalGeneration.generate,
which runs the OPT model's `generate` (`_sample` with do_sample=False, and
`_beam_search`) on the prompt [image_token_id] * Q + [bos] (+ the question
tokens, e.g. "Question: what digit is this? Answer:") with the image
embeddings in place of the placeholders. The prompt is run once
(Blip2.prefill, which fills the cache), then one token per sequence and step
(Blip2.decode_step).

Returned are the max_new_tokens generated tokens only, (B, max_new_tokens)
int32 (one compilation per shape): transformers returns the prompt followed
by them and crops at the longest sequence it produced; the positions it crops
hold the fill token here. Sequences end at eos_token_id and are filled after
it.

The step loop is a lax.while_loop that exits once every sequence is done, so
both functions compile once per (model config, prompt shape, max_new_tokens[,
num_beams, length_penalty, early_stopping]) and never per params: `model` is a
hashable static argument. Logits processors (min_length, repetition_penalty,
...) are not applied: transformers' defaults apply none.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from prsl_jax.models import generation

_NEG = -1.0e9  # transformers' beam search marks impossible candidates by adding this


def _inputs(model, images, input_ids, attention_mask, max_new_tokens):
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
  if input_ids is None:
    input_ids = model.prompt_ids(batch_size=images.shape[0])
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if input_ids.shape[0] != images.shape[0]:
    raise ValueError(f"input_ids has {input_ids.shape[0]} rows but there are "
                     f"{images.shape[0]} images")
  if attention_mask is None:
    attention_mask = jnp.ones(input_ids.shape, jnp.int32)
  model.check_ids(input_ids, attention_mask)
  return input_ids, jnp.asarray(attention_mask, jnp.int32), int(max_new_tokens)


def greedy(model, params, images, input_ids=None, attention_mask=None, *, max_new_tokens):
  """Greedy generation, as transformers' generate(pixel_values, input_ids,
  attention_mask, do_sample=False, num_beams=1, max_new_tokens=...).

  Args:
    model: the static Blip2 (hashable; jit static).
    params: its float32 params.
    images: (B, H, W, C) float in [0, 1] at model.image_size.
    input_ids: (B, P) int prompt with the Q image placeholders, bos and any
      question tokens (Blip2.prompt_ids builds it; rows of different lengths
      are padded on the left); None: captioning ([image] * Q + [bos]).
    attention_mask: (B, P), 0 = padding; None: all ones.
    max_new_tokens: tokens to generate.

  Returns:
    (B, max_new_tokens) int32: the argmax token at each step; after a
    sequence's eos_token_id, model.pad_token_id.
  """
  ids, mask, n = _inputs(model, images, input_ids, attention_mask, max_new_tokens)
  return _greedy(model, params, images, ids, mask, n)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _greedy(model, params, images, input_ids, attention_mask, max_new_tokens):
  eos, pad = model.eos_token_id, model.pad_token_id
  b = images.shape[0]
  logits, cache = model.prefill(params, images, input_ids, attention_mask,
                                max_new_tokens=max_new_tokens)
  seq = jnp.full((b, max_new_tokens), 0 if pad is None else pad, jnp.int32)

  def cond(state):
    g, _, _, _, unfinished = state
    return (g < max_new_tokens) & jnp.any(unfinished)

  def body(state):
    g, seq, cache, logits, unfinished = state
    nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # first max on ties, as torch
    if eos is not None:
      nxt = jnp.where(unfinished, nxt, pad)
      unfinished = unfinished & (nxt != eos)
    seq = jax.lax.dynamic_update_slice(seq, nxt[:, None], (0, g))
    logits, cache = model.decode_step(params, cache, nxt)
    return g + 1, seq, cache, logits, unfinished

  state = (jnp.int32(0), seq, cache, logits, jnp.ones((b,), bool))
  return jax.lax.while_loop(cond, body, state)[1]


def beam_search(model, params, images, input_ids=None, attention_mask=None, *,
                max_new_tokens, num_beams, length_penalty=1.0, early_stopping=False):
  """Beam search, as transformers' generate(pixel_values, input_ids,
  attention_mask, do_sample=False, num_beams=num_beams,
  max_new_tokens=max_new_tokens, length_penalty=length_penalty,
  early_stopping=early_stopping) with num_return_sequences=1.

  A port of transformers 5's vectorised `_beam_search` (as
  prsl_jax.models.generation.beam_search for the captioner), with the prompt
  run once per image and its cache repeated per beam: the top 2 * num_beams
  continuations by summed log-probability; those ending in EOS (or at
  max_new_tokens) among the first num_beams become finished hypotheses
  scored by sum_logprob / generated_len ** length_penalty; the best
  num_beams unfinished continue; transformers' stopping rules.

  Args:
    model, params, images, input_ids, attention_mask, max_new_tokens: as for
      `greedy`.
    num_beams: beams per image (>= 1).
    length_penalty: exponent on the generated length (static).
    early_stopping: True, False or "never", as in transformers.

  Returns:
    (B, max_new_tokens) int32, the best hypothesis per image, filled after
    its EOS with `pad_token_id or eos_token_id` as transformers fills (-1
    when there is no eos id).
  """
  if not isinstance(num_beams, (int, np.integer)) or num_beams < 1:
    raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
  if early_stopping not in (True, False, "never"):
    raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
  ids, mask, n = _inputs(model, images, input_ids, attention_mask, max_new_tokens)
  return _beam_search(model, params, images, ids, mask, n, int(num_beams),
                      float(length_penalty), early_stopping)


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8))
def _beam_search(model, params, images, input_ids, attention_mask, max_new_tokens,
                 num_beams, length_penalty, early_stopping):
  eos, pad = model.eos_token_id, model.config.text.pad_token_id
  b, k, n = images.shape[0], num_beams, max_new_tokens
  w = 2 * k  # beams_to_keep = max(2, 1 + n_eos) * num_beams, n_eos <= 1
  fill = -1 if eos is None else (pad if pad else eos)  # `pad or eos if eos else -1`
  pow_len = generation.pow_table(n, length_penalty)
  top_num_beam_mask = jnp.arange(w) < k

  # The prompt once per image, its cache and logits repeated per beam
  # (transformers expands the inputs; the values are the same). Rows: b * k + beam.
  logits, cache = model.prefill(params, images, input_ids, attention_mask, max_new_tokens=n)
  logits = jnp.repeat(logits, k, axis=0)
  cache = _take_rows(cache, jnp.repeat(jnp.arange(b), k))

  running_seq = jnp.full((b, k, n), fill, jnp.int32)
  running_scores = jnp.where(jnp.arange(k) == 0, 0.0, _NEG).astype(jnp.float32)
  running_scores = jnp.broadcast_to(running_scores, (b, k))
  state = dict(
      g=jnp.int32(0), cache=cache, logits=logits, running_seq=running_seq,
      running_scores=running_scores, seq=running_seq,
      scores=jnp.full((b, k), _NEG, jnp.float32),
      finished=jnp.zeros((b, k), bool),
      improvable=jnp.ones((b, 1), bool),  # is_early_stop_heuristic_unsatisfied
      done=jnp.bool_(False))

  def gather(x, idx):
    """x: (b, m0, ...), idx: (b, m) -> (b, m, ...)."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

  def body(s):
    g = s["g"]  # tokens generated so far (transformers' cur_len - prompt length)
    log_probs = jax.nn.log_softmax(s["logits"], axis=-1)
    vocab = log_probs.shape[-1]
    log_probs = log_probs.reshape(b, k, vocab) + s["running_scores"][:, :, None]
    log_probs = log_probs.reshape(b, k * vocab)

    # Top-w continuations over all beams (_get_top_k_continuations).
    topk_scores, topk_idx = jax.lax.top_k(log_probs, w)
    src_beam = topk_idx // vocab
    topk_ids = (topk_idx % vocab).astype(jnp.int32)
    topk_seq = gather(s["running_seq"], src_beam)
    topk_seq = jax.lax.dynamic_update_slice(topk_seq, topk_ids[:, :, None], (0, 0, g))

    # Stopping criteria on the sequences with g + 1 generated tokens.
    hits = jnp.broadcast_to(g + 1 >= n, (b, w))
    if eos is not None:
      hits = hits | (topk_ids == eos)

    # Unfinished beams for the next step (_get_running_beams_for_next_iteration).
    topk_running_scores = topk_scores + hits.astype(jnp.float32) * _NEG
    next_idx = jax.lax.top_k(topk_running_scores, k)[1]
    running_seq = gather(topk_seq, next_idx)
    running_scores = gather(topk_running_scores, next_idx)
    running_src = gather(src_beam, next_idx)

    # Finished hypotheses (_update_finished_beams).
    did_finish = hits & top_num_beam_mask[None, :]
    cand = topk_scores / pow_len[g + 1]
    full = jnp.all(s["finished"], axis=-1, keepdims=True) & (early_stopping is True)
    cand = cand + full.astype(jnp.float32) * _NEG
    cand = cand + (~s["improvable"]).astype(jnp.float32) * _NEG
    cand = cand + (~did_finish).astype(jnp.float32) * _NEG
    merged_seq = jnp.concatenate([s["seq"], topk_seq], axis=1)
    merged_scores = jnp.concatenate([s["scores"], cand], axis=1)
    merged_finished = jnp.concatenate([s["finished"], did_finish], axis=1)
    keep = jax.lax.top_k(merged_scores, k)[1]
    seq, scores = gather(merged_seq, keep), gather(merged_scores, keep)
    finished = gather(merged_finished, keep)

    # The cache follows its beams, then the chosen tokens are fed.
    rows = (jnp.arange(b)[:, None] * k + running_src).reshape(b * k)
    cache = _take_rows(s["cache"], rows)
    logits, cache = model.decode_step(params, cache, running_seq[:, :, g].reshape(b * k))

    # Can a running beam still beat the worst finished one
    # (_check_early_stop_heuristic)?
    g = g + 1
    if early_stopping == "never" and length_penalty > 0.0:
      best_len = pow_len[n]
    else:
      best_len = pow_len[g]
    best_possible = running_scores[:, :1] / best_len
    worst_finished = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), _NEG)
    improvable = s["improvable"] & jnp.any(best_possible > worst_finished, axis=-1,
                                           keepdims=True)
    # _beam_search_has_unfinished_sequences.
    open_beam = ~(jnp.all(finished) & (early_stopping is True))
    going = jnp.any(improvable) & open_beam & ~jnp.all(hits)
    return dict(g=g, cache=cache, logits=logits, running_seq=running_seq,
                running_scores=running_scores, seq=seq, scores=scores,
                finished=finished, improvable=improvable, done=~going)

  out = jax.lax.while_loop(lambda s: ~s["done"], body, state)
  return out["seq"][:, 0]


def _take_rows(cache, rows):
  """The cache of sequences `rows` (Blip2.prefill's layout)."""
  return dict(cache, k=jnp.take(cache["k"], rows, axis=1), v=jnp.take(cache["v"], rows, axis=1),
              key_mask=jnp.take(cache["key_mask"], rows, axis=0),
              position=jnp.take(cache["position"], rows, axis=0))
