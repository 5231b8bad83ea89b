"""Greedy and beam-search captioning in JAX, with a key/value cache.

Same conventions as transformers' `generate` for an encoder-decoder model
(generation/utils.py, `_sample` with do_sample=False and `_beam_search`):
sequences start with decoder_start_token_id, end at eos_token_id and are
padded after it. Differences are of shape only: ours is always (B, max_length)
(one compilation per shape), where transformers crops to the longest sequence
it produced; the positions it crops hold the fill token here (pad_token_id,
see `beam_search` for its one exception).

Every step runs the decoder on one token per sequence against a self-attention
cache (Captioner.decode_step); cross-attention keys/values are computed once
from the encoder states (Captioner.init_cache). The step loop is a
lax.while_loop that exits once every sequence is done, so both functions
compile once per (model config, batch, max_length[, num_beams, length_penalty,
early_stopping]) and never per params: `model` is a hashable static argument.

Logits processors (min_length, no_repeat_ngram_size, repetition_penalty, ...)
are not applied: transformers' defaults apply none.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

# transformers' beam search marks impossible candidates by adding this.
_NEG = -1.0e9


def resolve_max_length(model, max_length):
  """max_length (tokens, decoder_start included), or the model's default when None;
  an int in [2, model.max_positions], else a one-line error."""
  max_length = model.max_length if max_length is None else max_length
  n = model.max_positions
  if not isinstance(max_length, (int, np.integer)) or not 2 <= max_length <= n:
    raise ValueError(f"max_length must be an int in [2, n_positions={n}] (tokens, "
                     f"decoder_start included), got {max_length!r}")
  return int(max_length)


def greedy(model, params, images, *, max_length=None):
  """Greedy captions, as transformers' generate(pixel_values, do_sample=False,
  num_beams=1, max_length=max_length).

  Args:
    model: the static Captioner (hashable; jit static).
    params: its float32 params.
    images: (B, H, W, C) float in [0, 1] at model.image_size.
    max_length: tokens per sequence including decoder_start_token_id; None
      means model.max_length. At most n_positions.

  Returns:
    (B, max_length) int32: decoder_start_token_id, then the argmax token at
    each step; after a sequence's eos_token_id, pad_token_id. Once every
    sequence has ended the remaining columns are pad_token_id (transformers
    stops there and returns fewer columns). With eos_token_id None every
    sequence runs to max_length.
  """
  return _greedy(model, params, images, resolve_max_length(model, max_length))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _greedy(model, params, images, max_length):
  eos, pad = model.eos_token_id, model.pad_token_id
  b = images.shape[0]
  cache = model.init_cache(params, model.encode(params, images), max_length)
  seq = jnp.full((b, max_length), 0 if pad is None else pad, jnp.int32)
  seq = seq.at[:, 0].set(model.decoder_start_token_id)

  def cond(state):
    cur_len, _, _, unfinished = state
    return (cur_len < max_length) & jnp.any(unfinished)

  def body(state):
    cur_len, seq, cache, unfinished = state
    logits, cache = model.decode_step(params, cache, seq[:, cur_len - 1])
    nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # first max on ties, as torch
    if eos is not None:
      nxt = jnp.where(unfinished, nxt, pad)
      unfinished = unfinished & (nxt != eos)
    seq = jax.lax.dynamic_update_slice(seq, nxt[:, None], (0, cur_len))
    return cur_len + 1, seq, cache, unfinished

  state = (jnp.int32(1), seq, cache, jnp.ones((b,), bool))
  return jax.lax.while_loop(cond, body, state)[1]


def beam_search(model, params, images, *, num_beams, max_length=None,
                length_penalty=1.0, early_stopping=False):
  """Beam-search captions, as transformers' generate(pixel_values,
  do_sample=False, num_beams=num_beams, max_length=max_length,
  length_penalty=length_penalty, early_stopping=early_stopping)
  with num_return_sequences=1.

  A port of transformers 5's vectorised `_beam_search`, step for step: the
  top 2 * num_beams continuations of all beams by summed log-probability;
  those ending in EOS (or reaching max_length) among the first num_beams of
  them become finished hypotheses scored by sum_logprob / gen_len **
  length_penalty (gen_len = tokens after decoder_start); the best num_beams
  unfinished continue. The search stops as transformers' does (its early-stop
  heuristic; early_stopping True stops once num_beams hypotheses are
  finished; "never" runs the canonical bound with max_length).

  Args:
    model, params, images: as for `greedy`.
    num_beams: beams per image (>= 1; 1 is beam search with one beam, which
      equals greedy except for its fill token).
    max_length: as for `greedy`.
    length_penalty: exponent on the generated length when scoring finished
      hypotheses (> 0 favours longer ones). Static: each value compiles once.
    early_stopping: True, False or "never", as in transformers.

  Returns:
    (B, max_length) int32, the best hypothesis per image:
    decoder_start_token_id, tokens, eos_token_id, then the fill token.
    transformers fills with `pad_token_id or eos_token_id` (so eos when the
    pad id is 0; -1 when there is no eos id), and so does this.
  """
  if not isinstance(num_beams, (int, np.integer)) or num_beams < 1:
    raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
  if early_stopping not in (True, False, "never"):
    raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
  return _beam_search(model, params, images, resolve_max_length(model, max_length),
                      int(num_beams), float(length_penalty), early_stopping)


def pow_table(n, length_penalty):
  """float32(k ** length_penalty) for k = 0..n, computed in float64 as
  transformers does in Python, then rounded once."""
  with np.errstate(divide="ignore"):
    return jnp.asarray(np.arange(n + 1, dtype=np.float64) ** length_penalty, jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 6))
def _beam_search(model, params, images, max_length, num_beams, length_penalty,
                 early_stopping):
  eos, pad = model.eos_token_id, model.pad_token_id
  b, k, big_l = images.shape[0], num_beams, max_length
  w = 2 * k  # beams_to_keep = max(2, 1 + n_eos) * num_beams, n_eos <= 1
  fill = -1 if eos is None else (pad if pad else eos)  # `pad or eos if eos else -1`
  pow_len = pow_table(big_l, length_penalty)
  top_num_beam_mask = jnp.arange(w) < k

  # Encoder once per image; its states repeated per beam (transformers expands
  # the encoder outputs the same way). Rows are b * k + beam.
  states = jnp.repeat(model.encode(params, images), k, axis=0)
  cache = model.init_cache(params, states, big_l)

  running_seq = jnp.full((b, k, big_l), fill, jnp.int32)
  running_seq = running_seq.at[:, :, 0].set(model.decoder_start_token_id)
  running_scores = jnp.where(jnp.arange(k) == 0, 0.0, _NEG).astype(jnp.float32)
  running_scores = jnp.broadcast_to(running_scores, (b, k))
  state = dict(
      cur_len=jnp.int32(1), cache=cache, running_seq=running_seq,
      running_scores=running_scores, seq=running_seq,
      scores=jnp.full((b, k), _NEG, jnp.float32),
      finished=jnp.zeros((b, k), bool),
      improvable=jnp.ones((b, 1), bool),  # is_early_stop_heuristic_unsatisfied
      done=jnp.bool_(False))

  def gather(x, idx):
    """x: (b, n, ...), idx: (b, m) -> (b, m, ...)."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

  def body(s):
    cur_len = s["cur_len"]
    tokens = s["running_seq"][:, :, cur_len - 1].reshape(b * k)
    logits, cache = model.decode_step(params, s["cache"], tokens)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    vocab = log_probs.shape[-1]
    log_probs = log_probs.reshape(b, k, vocab) + s["running_scores"][:, :, None]
    log_probs = log_probs.reshape(b, k * vocab)

    # Top-w continuations over all beams (_get_top_k_continuations).
    topk_scores, topk_idx = jax.lax.top_k(log_probs, w)
    src_beam = topk_idx // vocab
    topk_ids = (topk_idx % vocab).astype(jnp.int32)
    topk_seq = gather(s["running_seq"], src_beam)
    topk_seq = jax.lax.dynamic_update_slice(topk_seq, topk_ids[:, :, None], (0, 0, cur_len))

    # Stopping criteria on the sequences of length cur_len + 1.
    hits = jnp.broadcast_to(cur_len + 1 >= big_l, (b, w))
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
    cand = topk_scores / pow_len[cur_len]  # gen_len = cur_len + 1 - prompt_len (1)
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

    # The self-attention cache follows its beams; cross keys/values are equal
    # across one image's beams, so they stay.
    rows = (jnp.arange(b)[:, None] * k + running_src).reshape(b * k)
    cache = dict(cache, self_k=jnp.take(cache["self_k"], rows, axis=1),
                 self_v=jnp.take(cache["self_v"], rows, axis=1))

    # Can a running beam still beat the worst finished one
    # (_check_early_stop_heuristic)?
    cur_len = cur_len + 1
    if early_stopping == "never" and length_penalty > 0.0:
      best_len = pow_len[big_l - 1]
    else:
      best_len = pow_len[cur_len - 1]
    best_possible = running_scores[:, :1] / best_len
    worst_finished = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), _NEG)
    improvable = s["improvable"] & jnp.any(best_possible > worst_finished, axis=-1,
                                           keepdims=True)
    # _beam_search_has_unfinished_sequences.
    open_beam = ~(jnp.all(finished) & (early_stopping is True))
    going = jnp.any(improvable) & open_beam & ~jnp.all(hits)
    return dict(cur_len=cur_len, cache=cache, running_seq=running_seq,
                running_scores=running_scores, seq=seq, scores=scores,
                finished=finished, improvable=improvable, done=~going)

  out = jax.lax.while_loop(lambda s: ~s["done"], body, state)
  return out["seq"][:, 0]
