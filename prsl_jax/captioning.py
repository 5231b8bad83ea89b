"""Captioners under attack: caption targets, attacks on captions, and their metrics.

    result = evaluate(model, params, tokenizer, source, indices, eps_list=[2 / 255],
                      suites={"paper": make_suite("paper", train_loss=...)})

The paper's setting (arXiv:2402.03627: ViT-GPT2 fine-tuned on COCO captions).
Attacks use the gradient attacks of prsl_jax.attacks on token logits:
logits_fn(x) = model.caption_logits(params, x, decoder_input_ids), shape (B, T, V),
teacher-forced on a caption whose tokens are the labels (IGNORE_INDEX after
its EOS):

  untargeted  raise the token loss of the model's own clean caption (the
              greedy caption on the clean image: the paper's label);
  targeted    lower the token loss of a target caption (targeted=True).

The parts, each a function of the run: `clean_pass`, `soundness_checks`,
`eps0_check`, `cascade` (one suite at one budget), `clean_scores`; `evaluate`
runs them through evaluation's shared skeleton (`evaluation.prepare`,
`batches`, `sharded`, `perturbation`, `in_ball`, `warn`, `skeleton`). The cascade
is AutoAttack's, with "robust" meaning "the generated caption did
not change": each attack of a suite runs only on the examples whose caption
every earlier attack left unchanged (untargeted), or that no earlier attack
turned into the target (targeted), and an example's outcome is its worst case
over the suite. Reported per budget: the caption change rate, keyword survival
(does the class word of a clean caption survive?), BLEU-4 / CIDEr of the
adversarial captions against the clean ones and against the references, the
targeted success rate, and the teacher-forced token loss before and after.
Clean: keyword accuracy, BLEU-4 / CIDEr against the references, and the
diversity of generation (distinct-1/2, vocabulary, mean length), the paper's
trade-off. Checks as for classifiers where they apply: deterministic captions,
finite non-zero input gradients, perturbations in the ball and [0, 1], and
eps = 0 leaving every caption unchanged.
"""

import dataclasses
import functools
import inspect
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from prsl_jax import attacks
from prsl_jax import caption_metrics
from prsl_jax import data
from prsl_jax import evaluation
from prsl_jax import losses
from prsl_jax import progress
from prsl_jax import sharding
from prsl_jax.models import captioner as captioner_lib
from prsl_jax.models import generation

IGNORE = losses.IGNORE_INDEX
DATA = sharding.DATA
ANSWER_MARK = data.ANSWER_MARK  # a question prompt ends here

# The caption suites (of the attacks whose record works on token logits).
SUITES = {"paper": ("bim",), "strong": ("apgd-ce",), "pgd": ("pgd-ce",)}
DEFAULT_SUITES = ("paper", "strong")


def make_suite(suite, **kwargs):
  """evaluation.make_suite for captioners: suite names of SUITES or token-logit attacks."""
  if isinstance(suite, str) and suite in SUITES:
    suite = list(SUITES[suite])
  attack_list = evaluation.make_suite(suite, "linf", **kwargs)
  unsupported = sorted(a.name for a in attack_list if not attacks.ATTACKS[a.name].tokens)
  if unsupported:
    usable = sorted(n for n, r in attacks.ATTACKS.items() if r.tokens)
    raise ValueError(f"{unsupported} attack classifiers, not captioners; for captions use "
                     f"{usable} or the suites {sorted(SUITES)}")
  return attack_list


# ----------------------------------------------------------------------------
# Caption tokens.
# ----------------------------------------------------------------------------


def tokenize_captions(tokenizer, texts, *, length, eos_token_id):
  """Caption texts -> labels (N, length) int32: tokens, EOS, then IGNORE_INDEX.

  As transformers' VisionEncoderDecoder training: labels are the caption's
  tokens (no start token; decoder inputs are shift_tokens_right(labels)), here
  ended by EOS so the model learns to stop, with padding ignored by the loss.
  A caption longer than length - 1 tokens is cut (EOS kept).
  """
  if tokenizer is None:
    raise ValueError("the captioner checkpoint has no tokenizer files")
  out = np.full((len(texts), length), IGNORE, np.int32)
  for i, ids in enumerate(tokenizer(list(texts), add_special_tokens=False)["input_ids"]):
    ids = list(ids)[:length - 1] + [eos_token_id]
    out[i, :len(ids)] = ids
  return out


def split_question(text, mark=ANSWER_MARK):
  """'Question: ... Answer: three' -> ('Question: ... Answer:', ' three'); a text
  without `mark` is a caption: ('', text)."""
  at = text.rfind(mark)
  if at < 0:
    return "", text
  return text[:at + len(mark)], text[at + len(mark):]


def tokenize_questions(tokenizer, texts, *, length, eos_token_id):
  """Captions or 'question + answer' texts -> (tokens (N, length) int32, prompt
  (N, length) bool).

  tokens as tokenize_captions' labels: the prompt's tokens (if any), the
  answer's or caption's, EOS, then IGNORE_INDEX; prompt marks the prompt's
  positions (teacher-forced, no loss). Prompt and answer are tokenized apart
  (BLIP-2's processor and the authors feed the prompt's tokens, then the
  answer's). A text that does not fit keeps its prompt and EOS and cuts the
  answer; a prompt that leaves no room for one answer token is an error.
  """
  if tokenizer is None:
    raise ValueError("the captioner checkpoint has no tokenizer files")
  tokens = np.full((len(texts), length), IGNORE, np.int32)
  prompt = np.zeros((len(texts), length), bool)
  for i, text in enumerate(texts):
    question, answer = split_question(text)
    q = list(tokenizer(question, add_special_tokens=False)["input_ids"]) if question else []
    if len(q) + 2 > length:
      raise ValueError(f"the prompt {question!r} has {len(q)} tokens: no room for an "
                       f"answer and EOS in caption_length={length}; raise caption_length")
    a = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    ids = q + a[:length - 1 - len(q)] + [eos_token_id]
    tokens[i, :len(ids)] = ids
    prompt[i, :len(q)] = True
  return tokens, prompt


def teacher_forcing(model, labels, prompt=None):
  """labels (B, T) -> the captioning batch fields of training.make_train_step.

  prompt: optional (B, T) bool, True on the prompt's tokens of labels
  (tokenize_questions): they are fed (decoder_input_ids) but get no loss (their
  labels become IGNORE_INDEX), so only the answer's tokens and EOS are learned.
  """
  labels = np.asarray(labels, np.int32)
  dec = np.asarray(captioner_lib.shift_tokens_right(labels, model.pad_token_id,
                                                    model.decoder_start_token_id))
  if prompt is not None:
    labels = np.where(np.asarray(prompt, bool), IGNORE, labels).astype(np.int32)
  return {"labels": labels, "decoder_input_ids": dec,
          "decoder_attention_mask": np.ones_like(dec)}


def generated_labels(tokens, eos_token_id, prompt_length=0):
  """Generated sequences (B, L) -> (decoder_input_ids (B, L-1), labels (B, L-1)).

  The sequence starts with decoder_start, then `prompt_length` prompt tokens
  (a question; 0 for a caption); labels are its tokens after the prompt, kept
  through the first EOS and IGNORE_INDEX after it (and on the prompt: the
  answer alone is the label, as in training).
  """
  dec, nxt = tokens[:, :-1], tokens[:, 1:]
  in_prompt = jnp.arange(nxt.shape[1])[None, :] < prompt_length
  is_eos = (nxt == eos_token_id) & ~in_prompt
  after = jnp.cumsum(is_eos.astype(jnp.int32), axis=1)
  ended_before = (after - is_eos) > 0
  return dec, jnp.where(ended_before | in_prompt, IGNORE, nxt)


def generate(model, params, images, *, max_length, prompt=(), prompt_mask=None):
  """Greedy tokens (B, 1 + P + max_length - 1): the start token, the question's
  P token ids (BLIP-2 only), the answer or caption.

  prompt: the question's ids, one list for every image or (B, P) per image
  (left-padded, prompt_mask (B, P) 0 on the padding); P = 0: a caption.
  """
  if np.shape(prompt)[-1] == 0:
    return model.caption(params, images, max_length=max_length)
  return model.caption(params, images, max_length=max_length, prompt=prompt,
                       prompt_mask=prompt_mask)


def question_ids(tokenizer, questions, pad_token_id):
  """N question strings -> (ids (N, P) int32, mask (N, P) int32): each question's
  tokens, left-padded with pad_token_id to the longest (mask 0 there)."""
  rows = [list(tokenizer(q, add_special_tokens=False)["input_ids"]) for q in questions]
  width = max(len(r) for r in rows)
  ids = np.full((len(rows), width), pad_token_id, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    if r:
      ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
  return ids, mask


def decoder_mask(question_mask, width):
  """The attention mask (B, width) of decoder inputs [start, question (B, P), the
  rest]: the question's padding is 0; None without a question (all ones)."""
  b, p = question_mask.shape
  if p == 0:
    return None
  xp = jnp if isinstance(question_mask, jax.Array) else np
  return xp.concatenate([xp.ones((b, 1), xp.int32), question_mask.astype(xp.int32),
                         xp.ones((b, width - 1 - p), xp.int32)], axis=1)


def decode(tokenizer, tokens):
  """(B, L) token ids -> B caption strings (special tokens dropped)."""
  return [t.strip() for t in tokenizer.batch_decode(np.asarray(tokens).tolist(),
                                                    skip_special_tokens=True)]


# ----------------------------------------------------------------------------
# Jitted batch functions (static: model, attack, lengths, mesh).
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("model", "max_length", "mesh"))
def _clean_batch(params, x, pq, pm, *, model, max_length, mesh):
  """-> greedy tokens (B, L), max |grad| (B,) and grad finite (B,) of the caption loss.

  pq, pm: (B, P) the questions' ids and mask (P = 0: captions)."""
  def run(params, x, pq, pm, axis_name):
    del axis_name
    tokens = generate(model, params, x, max_length=max_length, prompt=pq, prompt_mask=pm)
    dec, labels = generated_labels(tokens, model.eos_token_id, pq.shape[1])
    mask = decoder_mask(pm, dec.shape[1])
    def loss(x):
      return jnp.sum(attacks.ce_objective(model.caption_logits(params, x, dec, mask), labels))
    grad = jax.grad(loss)(x).reshape(x.shape[0], -1)
    return tokens, jnp.max(jnp.abs(grad), axis=1), jnp.all(jnp.isfinite(grad), axis=1)
  return evaluation.sharded(run, mesh, (P(), P(DATA), P(DATA), P(DATA)), params, x, pq, pm)


def per_caption_loss(loss):
  """A model's training loss as an attack objective on captions, one group per caption.

  The authors attack one image at a time (karlieswift/Mattack,
  vitgpt2/adv_vitgpt2_coco.py: a batch of one, the model's loss over that
  caption's tokens), so a batch-coupled loss such as PRSL takes each caption's
  token rows as its own group here, whatever the training group was: each image's
  step follows its own caption's loss, whichever captions share its batch.

  Args:
    loss: (name, ((arg, value), ...)) as in evaluation.Attack.loss.
  Returns:
    fn(token logits (B, T, V), labels (B, T)) -> scalar, the sum over the captions
    that have a valid token (all-padding rows of a padded batch add 0).
  """
  name, kwargs = loss
  kwargs = dict(kwargs)
  if "group_size" in kwargs:
    kwargs["group_size"] = None  # the caption's own rows
  fn = losses.get_loss(name, **kwargs)

  def objective(logits, labels):
    empty = jnp.all(labels == IGNORE, axis=-1)
    # An empty group's loss is NaN, and NaN leaks into gradients through where:
    # give empty captions one dummy valid token, then drop their terms.
    safe = labels.at[:, 0].set(jnp.where(empty, 0, labels[:, 0]))
    per = jax.vmap(fn)(logits, safe)
    return jnp.sum(jnp.where(empty, 0.0, per))
  return objective


@functools.partial(jax.jit, static_argnames=("model", "attack", "max_length", "targeted",
                                             "mesh"))
def _attack_batch(params, x, dec, labels, pq, pm, ids, valid, base_key, eps, *, model, attack,
                  max_length, targeted, mesh):
  """-> (adversarial greedy tokens, distance, in range, token loss clean, adversarial)."""
  def run(params, x, dec, labels, pq, pm, ids, valid, base_key, eps, axis_name):
    mask = decoder_mask(pm, dec.shape[1])
    fn = lambda z: model.caption_logits(params, z, dec, mask)
    keys = jax.vmap(functools.partial(jax.random.fold_in, base_key))(ids)
    y = jnp.where(valid[:, None], labels, IGNORE)  # padding rows leave batch losses
    # The captions' objectives are per caption: no cross-device group (axis_name).
    objective = "ce" if attack.loss is None else per_caption_loss(attack.loss)
    x_adv = attacks.ATTACKS[attack.name].run(
        attack, fn, x, y, attacks.Call(keys, eps, "linf", objective, toward=targeted))
    dist, in_range = evaluation.perturbation(x, x_adv, "linf")
    tokens = generate(model, params, jnp.where(jnp.isfinite(x_adv), x_adv, x),
                      max_length=max_length, prompt=pq, prompt_mask=pm)
    loss = lambda z: attacks.ce_objective(fn(z), labels)
    return tokens, dist, in_range, loss(x), loss(x_adv)
  specs = (P(), P(DATA), P(DATA), P(DATA), P(DATA), P(DATA), P(DATA), P(DATA), P(), P())
  return evaluation.sharded(run, mesh, specs, params, x, dec, labels, pq, pm, ids, valid,
                            base_key, eps)


# ----------------------------------------------------------------------------
# Results.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class CaptionEps:
  """One suite's cascade at one budget (untargeted, or toward the target caption).

  changed_after: {attack: fraction of captions changed (untargeted) / turned
  into the target (targeted) after that attack of the cascade}, cumulative.
  captions / broken_by: per example, the adversarial caption (of the attack
  that broke it, else of the last attack) and that attack (None if robust).
  """
  eps: float
  change_rate: float
  changed_after: dict
  keyword_survival: Optional[float]
  bleu4_vs_clean: float
  cider_vs_clean: float
  bleu4_vs_references: Optional[float]
  cider_vs_references: Optional[float]
  targeted_success: Optional[float]
  token_loss_clean: float
  token_loss_adversarial: float
  captions: list
  broken_by: list
  outside_ball: int
  seconds: float
  # With a question prompt: the answers' change rate after VQA normalisation
  # (caption_metrics.answer_change_rate) and the adversarial answers' VQA
  # accuracy against the references (when the source has answers).
  answer_change_rate: Optional[float] = None
  vqa_accuracy: Optional[float] = None


@dataclasses.dataclass
class CaptionResult:
  num_examples: int
  indices: list
  seed: int
  batch_size: int
  max_length: int
  clean_captions: list
  clean: dict       # keyword_accuracy, bleu4, cider, diversity
  suites: dict      # suite name -> [attack settings (dict)]
  robust: dict      # suite name -> [CaptionEps], untargeted
  targeted: dict    # suite name -> [CaptionEps] toward target_caption ({} if none)
  target_caption: Optional[str]
  checks: evaluation.Checks
  seconds: float = 0.0
  kind: str = "captioner"  # the result family: generated text under attack
  # compile_seconds, compiles, cache_hits, clean_and_checks_seconds, attack_seconds
  timing: dict = dataclasses.field(default_factory=dict)
  model_type: str = ""  # the model's config.json model_type: 'vision-encoder-decoder', 'blip-2'
  # The question every example was asked (VQA; clean_captions are then the
  # answers): a prompt, 'per example' (the source's own questions), or None
  # (captions).
  prompt: Optional[str] = None

  def to_dict(self):
    d = dataclasses.asdict(self)
    d["checks"]["passed"] = self.checks.passed
    return d


@dataclasses.dataclass
class _Run:
  """What every part of one evaluation shares (static model, arrays, settings)."""
  model: object
  params: object
  tokenizer: object
  source: object
  indices: np.ndarray
  batch_size: int
  max_length: int
  seed: int
  mesh: object
  bar: object
  # (N, P) each example's question ids, left-padded, and mask (VQA); P = 0: captions
  questions: np.ndarray = None
  question_mask: np.ndarray = None

  def batches(self, positions, extra=None):
    """Fixed-size image batches on the mesh (evaluation.batches); `extra` rows go
    along, and the questions (pq, pm)."""
    extra = dict(extra or {}, pq=self.questions, pm=self.question_mask)
    return evaluation.batches(self.source, self.indices, positions, self.batch_size,
                              self.mesh, labels=False, extra=extra)


@dataclasses.dataclass
class _Clean:
  """The clean pass: greedy tokens and captions, their teacher-forcing targets."""
  tokens: np.ndarray       # (N, L)
  captions: list
  dec: np.ndarray          # (N, L-1) decoder inputs
  labels: np.ndarray       # (N, L-1) labels, IGNORE_INDEX after EOS (and on the question)
  zero_gradient: int
  nonfinite_gradient: int
  first: tuple             # (evaluation.Batch, tokens) of the first batch


def clean_pass(run: _Run) -> _Clean:
  """Greedy captions of every example and the input gradients of their token loss."""
  n = len(run.indices)
  k = run.questions.shape[1]
  tokens = np.zeros((n, run.max_length + k), np.int32)
  zero_grad = nonfinite = 0
  first = None
  for b in run.batches(np.arange(n)):
    valid, rows = b.host_valid, b.rows
    tok, gmax, gfinite = jax.device_get(_clean_batch(
        run.params, b.images, b.extra["pq"], b.extra["pm"], model=run.model,
        max_length=run.max_length, mesh=run.mesh))
    tokens[rows[valid]] = tok[valid]
    zero_grad += int(np.sum((gmax == 0) & gfinite & valid))
    nonfinite += int(np.sum(~gfinite & valid))
    first = first or (b, tok)
    run.bar.update()
  dec, labels = (np.asarray(a) for a in generated_labels(jnp.asarray(tokens),
                                                         run.model.eos_token_id, k))
  return _Clean(tokens, decode(run.tokenizer, tokens[:, 1 + k:]), dec, labels, zero_grad,
                nonfinite, first)


def soundness_checks(run: _Run, clean: _Clean, checks):
  """Deterministic captions and usable input gradients, into `checks`."""
  b0, tok0 = clean.first
  valid0 = b0.host_valid
  again = jax.device_get(_clean_batch(run.params, b0.images, b0.extra["pq"], b0.extra["pm"],
                                      model=run.model, max_length=run.max_length,
                                      mesh=run.mesh))[0]
  checks.deterministic = bool(np.array_equal(again[valid0], tok0[valid0]))
  if not checks.deterministic:
    evaluation.warn(checks, "the captioner is not deterministic: two generations on the "
                    "same images differ")
  n = len(run.indices)
  checks.zero_gradient_fraction = clean.zero_gradient / n
  checks.nonfinite_gradient_fraction = clean.nonfinite_gradient / n
  checks.gradients_ok = clean.zero_gradient == 0 and clean.nonfinite_gradient == 0
  if not checks.gradients_ok:
    evaluation.warn(checks, "input gradients of the clean captions' token loss: "
                    f"{clean.zero_gradient} of {n} all zero, {clean.nonfinite_gradient} "
                    "not finite")


def eps0_check(run: _Run, clean: _Clean, attack_list, checks):
  """At eps = 0 every attack must leave every caption of the first batch as it is."""
  rows0 = np.arange(min(run.batch_size, len(run.indices)))
  for attack in attack_list:
    if attack.name in checks.eps0:
      continue
    b = next(run.batches(rows0, {"dec": clean.dec, "labels": clean.labels}))
    valid, rows = b.host_valid, b.rows
    tok, dist, in_range, _, _ = jax.device_get(_attack_batch(
        run.params, b.images, b.extra["dec"], b.extra["labels"], b.extra["pq"], b.extra["pm"],
        b.ids, b.valid, evaluation.attack_key(run.seed, 0.0, attack.name), jnp.float32(0.0),
        model=run.model, attack=attack, max_length=run.max_length, targeted=False,
        mesh=run.mesh))
    checks.eps0[attack.name] = {
        "max_distance": float(np.max(dist[valid])),
        "captions_unchanged": bool(np.array_equal(tok[valid], clean.tokens[rows[valid]])),
        "in_range": bool(in_range[valid].all())}
  checks.eps0_ok = all(v["max_distance"] <= 1e-6 and v["captions_unchanged"] and v["in_range"]
                       for v in checks.eps0.values())
  if not checks.eps0_ok:
    evaluation.warn(checks, f"at eps=0 the attacks change captions: {checks.eps0}")


def cascade(run: _Run, clean: _Clean, attack_list, eps, *, target=None, refs=None,
            keywords=None, answers=None) -> CaptionEps:
  """One suite at one budget: each attack on the captions every earlier one left as
  they were (untargeted), or that no earlier one turned into `target` (targeted)."""
  t_start = time.time()
  n = len(run.indices)
  same = lambda a, b: caption_metrics.tokenize(a) == caption_metrics.tokenize(b)
  k = run.questions.shape[1]
  if target is not None:
    # Each example's question, then the target's tokens (labels on the target only).
    lab = tokenize_captions(run.tokenizer, [(" " if k else "") + target],
                            length=run.max_length - 1, eos_token_id=run.model.eos_token_id)
    lab = np.repeat(lab, n, axis=0)
    fed = np.concatenate([run.questions, np.where(lab == IGNORE, run.model.pad_token_id, lab)],
                         axis=1)
    dec = np.concatenate([np.full((n, 1), run.model.decoder_start_token_id, np.int32),
                          fed[:, :-1]], axis=1).astype(np.int32)
    labels = np.concatenate([np.full((n, k), IGNORE, np.int32), lab], axis=1)
    attackable = np.array([not same(c, target) for c in clean.captions])
  else:
    dec, labels, attackable = clean.dec, clean.labels, np.ones(n, bool)
  done = np.zeros(n, bool)
  adv_captions, broken_by = list(clean.captions), [None] * n
  changed_after, outside = {}, 0
  loss_clean, loss_adv = np.zeros(n), np.zeros(n)
  for attack in attack_list:
    positions = np.flatnonzero(attackable & ~done)
    run.bar.reset(total=-(-len(positions) // run.batch_size),
                  desc=f"eps={evaluation.format_eps(eps)} {attack.name}"
                  + (" (targeted)" if target is not None else ""))
    key = evaluation.attack_key(run.seed, eps,
                                attack.name + ("-targeted" if target is not None else ""))
    for b in run.batches(positions, {"dec": dec, "labels": labels}):
      valid, rows = b.host_valid, b.rows
      tok, dist, in_range, l0, l1 = jax.device_get(_attack_batch(
          run.params, b.images, b.extra["dec"], b.extra["labels"], b.extra["pq"],
          b.extra["pm"], b.ids, b.valid, key, jnp.float32(eps), model=run.model,
          attack=attack, max_length=run.max_length, targeted=target is not None,
          mesh=run.mesh))
      ok = evaluation.in_ball(dist, in_range, eps, "linf", None)
      outside += int(np.sum(~ok & valid))
      texts = decode(run.tokenizer, tok[:, 1 + k:])
      for j in np.flatnonzero(valid):
        r = rows[j]
        if ok[j]:
          adv_captions[r] = texts[j]
        loss_clean[r], loss_adv[r] = l0[j], l1[j]
        hit = same(texts[j], target) if target is not None else \
            not same(texts[j], clean.captions[r])
        if ok[j] and hit:
          done[r], broken_by[r] = True, attack.name
      run.bar.update()
    changed_after[attack.name] = float(done[attackable].mean()) if attackable.any() else 0.0
  rate = float(done[attackable].mean()) if attackable.any() else 0.0
  scored = np.flatnonzero(attackable)
  result = CaptionEps(
      eps=eps, change_rate=rate, changed_after=changed_after, keyword_survival=None,
      bleu4_vs_clean=0.0, cider_vs_clean=0.0, bleu4_vs_references=None,
      cider_vs_references=None, targeted_success=rate if target is not None else None,
      token_loss_clean=float(loss_clean[scored].mean()) if scored.size else 0.0,
      token_loss_adversarial=float(loss_adv[scored].mean()) if scored.size else 0.0,
      captions=adv_captions, broken_by=broken_by, outside_ball=outside,
      seconds=time.time() - t_start)
  if target is None:
    result.change_rate = caption_metrics.change_rate(clean.captions, adv_captions)
    if k:
      result.answer_change_rate = caption_metrics.answer_change_rate(clean.captions,
                                                                     adv_captions)
      if answers:
        result.vqa_accuracy = caption_metrics.vqa_accuracy(adv_captions, answers)
    if keywords:
      result.keyword_survival = caption_metrics.keyword_survival(clean.captions,
                                                                 adv_captions, keywords)
    if n > 1:
      clean_refs = [[c] if caption_metrics.tokenize(c) else ["<empty>"]
                    for c in clean.captions]
      scores = caption_metrics.caption_scores(adv_captions, clean_refs)
      result.bleu4_vs_clean, result.cider_vs_clean = scores["bleu4"], scores["cider"]
      if refs:
        scores = caption_metrics.caption_scores(adv_captions, refs)
        result.bleu4_vs_references = scores["bleu4"]
        result.cider_vs_references = scores["cider"]
  return result


def clean_scores(clean: _Clean, refs, keywords, answers=None):
  """Diversity of clean generation, and its quality when references/keywords exist
  (and, for answers to a question, the VQA accuracy against `answers`)."""
  out = {"diversity": caption_metrics.diversity(clean.captions)}
  if answers:
    out["vqa_accuracy"] = caption_metrics.vqa_accuracy(clean.captions, answers)
  if refs:
    out.update(caption_metrics.caption_scores(clean.captions, refs))
  if keywords:
    out["keyword_accuracy"] = caption_metrics.keyword_accuracy(clean.captions, keywords)
  return out


def evaluate(model, params, tokenizer, source, indices, *, eps_list, suites=None, seed=0,
             batch_size=32, max_length=None, target_caption=None, prompt=None, mesh=None,
             progress_bar=True) -> CaptionResult:
  """Clean captions and attacks on them (see the module docstring).

  Args:
    model: the static Captioner; params: its params; tokenizer: its tokenizer.
    source: random-access source of dicts with 'image' (prsl_jax.data); if it
      has `references(i)` and `keyword(i)`, BLEU/CIDEr against the references
      and keyword survival are reported.
    indices: the examples of `source` to evaluate (N).
    eps_list: L-inf budgets in [0, 1] pixel units.
    suites: {name: tuple of Attack} (make_suite); default the paper's protocol
      (BIM-10 through cross-entropy) and APGD-CE on the token loss.
    seed: PRNG seed of the attacks (keys per example, as evaluation's).
    batch_size: images per attack call (fixed; the last batch is padded).
    max_length: generation length (tokens incl. the start token); None: the
      model's.
    target_caption: a caption to attack toward (targeted), or None.
    prompt: a question asked of every image (VQA, e.g. "Question: what digit
      is this? Answer:"; BLIP-2 only), or None: each example's own question
      when the source has `question(i)` (a VQA source), else captions.
      Generation starts after the question, the attacks' labels are the clean
      answer's tokens (the question's are ignored), and the answers are scored
      by change rate and, when the source has `answers(i)`, VQA accuracy
      (caption_metrics.vqa_accuracy); max_length then counts the answer's
      tokens plus the start token.
    mesh: data mesh, or None for one device.
  """
  asks = bool(prompt) or hasattr(source, "question")
  if asks:
    if "prompt" not in inspect.signature(model.caption).parameters:
      raise ValueError(f"a {model.kind} model answers no questions; evaluate a BLIP-2 on "
                       "questions (eval.prompt, or a VQA source), a captioner on captions")
    if tokenizer is None:
      raise ValueError("the checkpoint has no tokenizer files to tokenize the questions")
  t0 = time.time()
  if suites is None:
    suites = {name: make_suite(name) for name in DEFAULT_SUITES}
  for suite in suites.values():
    make_suite([a.name for a in suite])  # token-logit attacks only
  inputs = evaluation.prepare(eps_list, indices, batch_size, "linf", mesh, params)
  eps_list, indices, batch_size, params = (inputs.eps_list, inputs.indices,
                                           inputs.batch_size, inputs.variables)
  max_length = generation.resolve_max_length(model, max_length)
  n = len(indices)
  bar = progress.bar(total=-(-n // batch_size), desc="clean captions", enabled=progress_bar)
  if asks:
    texts = [prompt] * n if prompt else [source.question(int(i)) for i in indices]
    questions, question_mask = question_ids(tokenizer, texts, model.pad_token_id)
  else:
    questions, question_mask = np.zeros((n, 0), np.int32), np.zeros((n, 0), np.int32)
  run = _Run(model, params, tokenizer, source, indices, batch_size, max_length, seed, mesh,
             bar, questions, question_mask)
  refs = [source.references(int(i)) for i in indices] if hasattr(source, "references") \
      else None
  keywords = [source.keyword(int(i)) for i in indices] if hasattr(source, "keyword") \
      else None
  answers = None
  if asks:  # answers, not captions: scored against the reference answers
    answers = [source.answers(int(i)) for i in indices] if hasattr(source, "answers") \
        else None
    refs = keywords = None
  checks = evaluation.Checks()

  def cascades(clean, checks):
    del checks  # the caption cascade flags images outside the ball in its result
    robust = {name: [cascade(run, clean, suite, eps, refs=refs, keywords=keywords,
                             answers=answers)
                     for eps in eps_list] for name, suite in suites.items()}
    targeted = {}
    if target_caption is not None:
      targeted = {name: [cascade(run, clean, suite, eps, target=target_caption)
                         for eps in eps_list] for name, suite in suites.items()}
    return robust, targeted

  clean, (robust, targeted), timing = evaluation.skeleton(evaluation.Parts(
      clean_pass=lambda: clean_pass(run),
      soundness_checks=lambda clean, checks: soundness_checks(run, clean, checks),
      eps0_check=lambda clean, checks: eps0_check(
          run, clean, [a for suite in suites.values() for a in suite], checks),
      cascades=cascades), checks, bar)
  outside = sum(r.outside_ball for rs in (*robust.values(), *targeted.values()) for r in rs)
  checks.ball_ok = outside == 0
  if outside:
    evaluation.warn(checks, f"{outside} adversarial images were outside the ball or [0, 1]; "
                    "they were not counted")
  return CaptionResult(
      num_examples=n, indices=indices.tolist(), seed=seed, batch_size=batch_size,
      max_length=max_length, clean_captions=clean.captions,
      clean=clean_scores(clean, refs, keywords, answers),
      suites={k: [dataclasses.asdict(a) for a in v] for k, v in suites.items()},
      robust=robust, targeted=targeted, target_caption=target_caption, checks=checks,
      seconds=time.time() - t0, timing=timing, model_type=getattr(model, "kind", ""),
      prompt=prompt or ("per example" if asks else None))
