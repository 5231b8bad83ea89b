"""Caption metrics against hand-computed values and independent re-implementations.

BLEU rule tested (read from pycocoevalcap 1.2, bleu/bleu_scorer.py, option
"closest"): per image, candidate n-gram counts clipped by the max count in any
one reference; clipped counts and n-gram totals summed over the corpus;
p_n = (correct_n + 1e-15) / (total_n + 1e-9); BLEU-4 = (p1 p2 p3 p4)^(1/4),
times exp(1 - r/c) when c < r (c: total candidate length, r: sum of each
image's reference length closest to its candidate's, ties to the shorter).

CIDEr-D rule tested (cider/cider_scorer.py): see caption_metrics.cider.
"""

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from prsl_jax import caption_metrics as cm

SMALL, TINY = 1e-9, 1e-15  # pycocoevalcap's guards against 0/0 and log(0)


# ----------------------------------------------------------------------------
# tokenize
# ----------------------------------------------------------------------------


def test_tokenize_lowercases_and_splits_on_punctuation():
  assert cm.tokenize("A Dog's ball-pit, 2 kids!") == ["a", "dog", "s", "ball", "pit",
                                                       "2", "kids"]
  assert cm.tokenize("  Café “naïve”\tsnake_case\n") == ["café", "naïve", "snake", "case"]
  assert cm.tokenize("...") == []


# ----------------------------------------------------------------------------
# BLEU-4
# ----------------------------------------------------------------------------


def test_bleu4_of_exact_copies_is_one():
  cands = ["a man rides a horse on the beach", "two cats sleep on a red sofa"]
  # The 1e-9 guards keep it just below 1 (about 1 - 1e-9).
  assert cm.bleu4(cands, [[c] for c in cands]) == pytest.approx(1.0, abs=1e-8)
  # Case and punctuation are tokenized away.
  assert cm.bleu4(["A man rides a horse."], [["a man, rides a HORSE"]]) == pytest.approx(
      1.0, abs=1e-8)


def test_bleu4_hand_computed_two_images():
  cands = ["A cat sits on the mat.", "Dogs play in snow"]
  refs = [["A cat sits on a mat", "The cat is sitting on the mat!"],
          ["Two dogs play in the snow.", "Dogs are playing in the deep snow"]]
  # Image 1, candidate length 6, closest reference length 6 (refs: 6, 7).
  #   1-grams: all 6 in some reference ("a" once in the candidate)    6/6
  #   2-grams: a cat, cat sits, sits on (ref 1); on the, the mat (ref 2)  5/5
  #   3-grams: a cat sits, cat sits on, on the mat; not sits on the    3/4
  #   4-grams: a cat sits on; not cat sits on the, sits on the mat     1/3
  # Image 2, candidate length 4, closest reference length 6 (refs: 6, 7).
  #   1-grams: dogs, play, in, snow                                    4/4
  #   2-grams: dogs play, play in; not in snow                         2/3
  #   3-grams: dogs play in; not play in snow                          1/2
  #   4-grams: not dogs play in snow                                   0/1
  correct, total = [10, 7, 4, 1], [10, 8, 6, 4]
  c, r = 6 + 4, 6 + 6
  p = [(k + TINY) / (t + SMALL) for k, t in zip(correct, total)]
  want = math.exp(1 - r / c) * math.prod(p) ** 0.25  # = 0.8187 * 0.6180
  assert want == pytest.approx(0.505947, abs=1e-6)
  assert cm.bleu4(cands, refs) == pytest.approx(want, rel=1e-9)


def test_bleu4_closest_reference_length_breaks_ties_to_the_shorter():
  # Candidate of 5 tokens, references of 4 and 6: both at distance 1; the
  # shorter (4) is used, so c = 5 > r = 4 and there is no brevity penalty.
  cand = ["a b c d e"]
  refs = [["a b c d", "a b c d e f"]]
  p = [(k + TINY) / (t + SMALL) for k, t in zip([5, 4, 3, 2], [5, 4, 3, 2])]
  assert cm.bleu4(cand, refs) == pytest.approx(math.prod(p) ** 0.25, rel=1e-9)
  # With only the longer reference, the penalty exp(1 - 6/5) applies.
  assert cm.bleu4(cand, [["a b c d e f"]]) == pytest.approx(
      math.exp(1 - 6 / 5) * math.prod(p) ** 0.25, rel=1e-9)


def test_bleu4_clips_repeated_words_by_the_max_count_in_one_reference():
  # "the" x4 in the candidate, at most 2 in one reference: 2 of 4 unigrams.
  cand, refs = ["the the the the"], [["the cat on the mat", "the dog"]]
  # bigrams "the the" x3: none in refs; no 3/4-gram matches either.
  p = [(2 + TINY) / (4 + SMALL), TINY / (3 + SMALL), TINY / (2 + SMALL), TINY / (1 + SMALL)]
  # closest reference length to 4: 5 (distance 1) vs 2 (distance 2).
  want = math.exp(1 - 5 / 4) * math.prod(p) ** 0.25
  assert cm.bleu4(cand, refs) == pytest.approx(want, rel=1e-9)
  assert 0 < want < 1e-4  # not 0: the 1e-15 guard, not smoothing


def test_bleu4_without_any_four_gram_is_not_zero():
  # 3-token exact copies: p4 = (0 + 1e-15) / (0 + 1e-9) = 1e-6.
  assert cm.bleu4(["a dog runs"], [["a dog runs"]]) == pytest.approx(1e-6 ** 0.25, rel=1e-6)


def _reference_bleu4(cands, refs):
  """Independent corpus BLEU-4 with pycocoevalcap's rule (module docstring)."""
  correct, total, c, r = [0] * 4, [0] * 4, 0, 0
  for cand, rs in zip(cands, refs):
    ct, rts = cand.split(), [x.split() for x in rs]
    for n in range(1, 5):
      cc = Counter(tuple(ct[i:i + n]) for i in range(len(ct) - n + 1))
      best = Counter()
      for rt in rts:
        best |= Counter(tuple(rt[i:i + n]) for i in range(len(rt) - n + 1))  # max
      correct[n - 1] += sum(min(k, best[g]) for g, k in cc.items())
      total[n - 1] += max(0, len(ct) - n + 1)
    c += len(ct)
    r += len(min(rts, key=lambda rt: (abs(len(rt) - len(ct)), len(rt))))  # ties: shorter
  bleu = math.prod((k + TINY) / (t + SMALL) for k, t in zip(correct, total)) ** 0.25
  ratio = (c + TINY) / (r + SMALL)
  return bleu * math.exp(1 - 1 / ratio) if ratio < 1 else bleu


_WORDS = st.sampled_from(["a", "dog", "cat", "runs", "on", "grass"])
_CAPTION = st.lists(_WORDS, min_size=1, max_size=7).map(" ".join)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(_CAPTION, st.lists(_CAPTION, min_size=1, max_size=3)),
                min_size=1, max_size=4))
def test_bleu4_matches_independent_implementation(corpus):
  cands, refs = [c for c, _ in corpus], [r for _, r in corpus]
  got = cm.bleu4(cands, refs)
  assert 0 <= got <= 1
  assert got == pytest.approx(_reference_bleu4(cands, refs), rel=1e-9)


# ----------------------------------------------------------------------------
# CIDEr-D
# ----------------------------------------------------------------------------


def test_cider_of_one_image_is_zero_idf_needs_a_corpus():
  assert cm.cider(["a dog runs on the grass"], [["a dog runs on the grass"]]) == 0.0


def test_cider_hand_computed_with_clipping_and_length_penalty():
  # Disjoint vocabularies, one reference each: every idf is log(2) (df = 1 for
  # reference n-grams, df = 0 -> max(1, 0) for "red red"...), so it cancels in
  # the cosine. Image 2 is an exact copy of >= 4 tokens: 10.
  cands = ["red red car parked outside", "blue boat sails away"]
  refs = [["red car parked outside"], ["blue boat sails away"]]
  # Image 1: unigrams c = (red 2, car, parked, outside), r = (1, 1, 1, 1):
  #   clipped dot min(2, 1) * 1 + 3 = 4 over |c| |r| = sqrt(7) * 2;
  #   bigrams 3 shared of c 4, r 3: 3 / (2 sqrt 3); trigrams 2 / (sqrt 3 sqrt 2);
  #   4-grams 1 / (sqrt 2 * 1); lengths 5 vs 4: exp(-1 / 72).
  sims = [4 / (math.sqrt(7) * 2), 3 / (2 * math.sqrt(3)), 2 / math.sqrt(6), 1 / math.sqrt(2)]
  image1 = 10 * math.exp(-1 / 72) * np.mean(sims)
  want = (image1 + 10.0) / 2
  assert want == pytest.approx(8.877714, abs=1e-6)
  assert cm.cider(cands, refs) == pytest.approx(want, rel=1e-9)


def _numpy_cider(cands, refs, sigma=6.0):
  """CIDEr-D from its definition, with dense NumPy tf-idf vectors.

  tf = raw n-gram counts (as pycocoevalcap; the paper normalizes them), idf =
  log(N) - log(max(1, df)) over the N images' reference sets, per n = 1..4 the
  clipped cosine sum(min(c, r) * r) / (|c| |r|), times exp(-dl^2 / (2 sigma^2))
  with dl the difference in token counts, averaged over n, over references,
  times 10, averaged over images.
  """
  toks = [[s.split() for s in [c] + list(rs)] for c, rs in zip(cands, refs)]
  grams = sorted({tuple(t[i:i + n]) for im in toks for t in im for n in range(1, 5)
                  for i in range(len(t) - n + 1)})
  col = {g: k for k, g in enumerate(grams)}
  order = np.array([len(g) for g in grams])

  def counts(t):
    v = np.zeros(len(grams))
    for n in range(1, 5):
      for i in range(len(t) - n + 1):
        v[col[tuple(t[i:i + n])]] += 1
    return v

  ref_counts = [np.stack([counts(t) for t in im[1:]]) for im in toks]
  df = np.sum([rc.sum(0) > 0 for rc in ref_counts], axis=0)
  idf = np.log(len(cands)) - np.log(np.maximum(1.0, df))
  scores = []
  for im, rc in zip(toks, ref_counts):
    gc = counts(im[0]) * idf
    per_n = np.zeros(4)
    for t, r in zip(im[1:], rc):
      gr = r * idf
      penalty = np.exp(-(len(im[0]) - len(t)) ** 2 / (2 * sigma ** 2))
      for n in range(1, 5):
        m = order == n
        norm = np.linalg.norm(gc[m]) * np.linalg.norm(gr[m])
        if norm > 0:
          per_n[n - 1] += penalty * np.sum(np.minimum(gc[m], gr[m]) * gr[m]) / norm
    scores.append(10 * per_n.mean() / len(rc))
  return float(np.mean(scores))


def test_cider_matches_numpy_definition_on_three_images():
  cands = ["a dog runs on the grass", "a cat a cat on the sofa", "a red bus"]
  refs = [["a dog running on green grass", "the dog runs on the lawn", "a brown dog"],
          ["a cat sleeping on a sofa", "the cat lies on the sofa"],
          ["a red double decker bus on the street", "a bus on a road in the city"]]
  got = cm.cider(cands, refs)
  assert got == pytest.approx(_numpy_cider(cands, refs), rel=1e-9)
  assert 0 < got < 10


def test_cider_identical_candidates_beat_unrelated_ones():
  refs = [["a dog runs on the grass"], ["a cat sleeps on the sofa"],
          ["a red bus on the street"]]
  same = cm.cider([r[0] for r in refs], refs)
  unrelated = cm.cider(["blue whale in deep ocean water"] * 3, refs)
  assert same > 5 * unrelated
  assert unrelated == 0.0  # no shared n-gram at all


# ----------------------------------------------------------------------------
# Change under attack
# ----------------------------------------------------------------------------


def test_change_rate_on_tokens():
  clean = ["A dog.", "a cat", "a bird"]
  adversarial = ["a DOG", "a cat sleeping", "a plane"]  # first: case/punct only
  assert cm.change_rate(clean, adversarial) == pytest.approx(2 / 3)


def test_keyword_survival_hand_example():
  clean = ["a dog on grass", "a cat on a sofa", "an aquarium fish swims", "a truck",
           "two dogs", "a hotdog"]
  adversarial = ["a cat on grass", "a cat sleeping", "aquarium fish in a tank", "a car",
                 "dog", "dog"]
  keywords = ["dog", "cat", "Aquarium fish", "bird", "dog", "dog"]
  # Eligible: 0, 1, 2 ("dogs" and "hotdog" are not "dog"; no "bird" in 3);
  # kept: 1, 2.
  assert cm.keyword_survival(clean, adversarial, keywords) == pytest.approx(2 / 3)
  # A multi-word keyword must be a contiguous run.
  assert cm.keyword_survival(["aquarium fish"], ["fish in an aquarium"],
                             ["aquarium fish"]) == 0.0


def test_keyword_survival_is_nan_when_no_clean_caption_has_its_keyword():
  assert math.isnan(cm.keyword_survival(["a truck", "a car"], ["a dog", "a cat"],
                                        ["dog", "cat"]))


def test_targeted_success_rate_on_tokens():
  adversarial = ["a photo of a banana.", "a dog", "A Photo of a banana", "a banana"]
  assert cm.targeted_success_rate(adversarial, ["a photo of a banana"] * 4) == 0.5


# ----------------------------------------------------------------------------
# Diversity
# ----------------------------------------------------------------------------


def test_distinct_n_vocabulary_and_length_hand_example():
  caps = ["A dog runs.", "a dog sits"]
  assert cm.distinct_n(caps, 1) == pytest.approx(4 / 6)  # a, dog, runs, sits of 6
  assert cm.distinct_n(caps, 2) == pytest.approx(3 / 4)  # "a dog" twice
  assert cm.distinct_n(caps, 3) == 1.0
  assert math.isnan(cm.distinct_n(caps, 4))  # no 4-grams
  assert math.isnan(cm.distinct_n(["a", "dog"], 2))  # n-grams never span captions
  assert cm.vocabulary_size(caps) == 4
  assert cm.mean_length(caps + ["..."]) == pytest.approx(6 / 3)
  assert cm.diversity(caps) == {"distinct_1": 4 / 6, "distinct_2": 3 / 4,
                                "vocabulary_size": 4, "mean_length": 3.0}


def test_caption_scores_bundles_bleu4_and_cider():
  cands, refs = ["a dog runs", "a cat sits down"], [["a dog runs"], ["a cat sat down"]]
  assert cm.caption_scores(cands, refs) == {"bleu4": cm.bleu4(cands, refs),
                                            "cider": cm.cider(cands, refs)}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(alphabet="ab .", max_size=12), min_size=1, max_size=6),
       st.integers(1, 3))
def test_properties(caps, n):
  d = cm.distinct_n(caps, n)
  assert math.isnan(d) or 0 < d <= 1
  assert math.isnan(d) == all(len(cm.tokenize(c)) < n for c in caps)
  assert cm.change_rate(caps, caps) == 0.0
  assert cm.vocabulary_size(caps) <= sum(len(cm.tokenize(c)) for c in caps)


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("call, match", [
    (lambda: cm.tokenize(None), "caption must be a str"),
    (lambda: cm.bleu4(["a b"], [["a b"], ["c"]]), "candidates and references"),
    (lambda: cm.bleu4([], []), "candidates must be a non-empty"),
    (lambda: cm.cider(["a b"], ["a b"]), r"references\[0\] must be a list"),
    (lambda: cm.cider(["a b"], [[]]), r"references\[0\] must be a non-empty"),
    (lambda: cm.cider(["a b"], [["a b", "?!"]]), r"references\[0\]\[1\] has no tokens"),
    (lambda: cm.cider("a b", [["a b"]]), "candidates must be a list"),
    (lambda: cm.change_rate(["a"], ["a", "b"]), "clean and adversarial"),
    (lambda: cm.change_rate(["a", 3], ["a", "b"]), r"clean\[1\] must be a str"),
    (lambda: cm.keyword_survival(["a"], ["a"], ["a", "b"]), "clean and keywords"),
    (lambda: cm.keyword_survival(["a"], ["a"], [" "]), r"keywords\[0\] has no tokens"),
    (lambda: cm.targeted_success_rate(["a"], [""]), r"targets\[0\] has no tokens"),
    (lambda: cm.distinct_n(["a b"], 0), "n must be an int >= 1"),
    (lambda: cm.distinct_n(["a b"], True), "n must be an int >= 1"),
    (lambda: cm.vocabulary_size([]), "captions must be a non-empty"),
    (lambda: cm.mean_length(None), "captions must be a list"),
])
def test_bad_input_raises_one_line_value_error(call, match):
  with pytest.raises(ValueError, match=match) as info:
    call()
  assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------
# VQA answers: the official evaluation's normalisation and soft accuracy
# (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py).
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("raw,norm", [
    ("The Three.", "3"),          # article dropped, number word, final period
    ("  two\n", "2"),
    ("a dog's", "dog s"),         # "'" inside a word becomes a space (vqaEval's rule)
    ("yes, it is", "yes it is"),  # "," before a space is removed
    ("1,000", "1000"),            # digit-comma-digit: punctuation removed, not spaced
    ("3.5", "3.5"),               # a period before a digit stays
    ("dont know", "don't know"),  # contraction restored
    ("None", "0"),
    ("an apple", "apple"),
])
def test_normalize_answer_as_the_official_vqa_eval(raw, norm):
  assert cm.normalize_answer(raw) == norm


def test_vqa_score_by_hand():
  # Ten references, the answer given by k of them: the average over the ten
  # leave-one-out subsets of min(1, matches / 3).
  refs = ["two"] * 2 + ["three"] * 8
  # "2": k = 2. Leaving out one of the two "two": 1 match -> 1/3 (2 subsets);
  # leaving out a "three": 2 matches -> 2/3 (8 subsets). (2/3 + 16/3) / 10 = 0.6
  assert cm.vqa_score("2", refs) == pytest.approx(0.6)
  # "three": k = 8 >= 4, every subset still has >= 3 matches.
  assert cm.vqa_score("Three", refs) == 1.0
  # k = 3: leaving out a match leaves 2 -> 2/3 (3 subsets), else 3 -> 1 (7 subsets).
  refs3 = ["cat"] * 3 + ["dog"] * 7
  assert cm.vqa_score("a cat", refs3) == pytest.approx((3 * 2 / 3 + 7) / 10)
  assert cm.vqa_score("bird", refs3) == 0.0
  # One reference: exact match after normalisation.
  assert cm.vqa_score("the 3", ["three"]) == 1.0 and cm.vqa_score("4", ["three"]) == 0.0
  assert cm.vqa_accuracy(["2", "bird"], [refs, refs3]) == pytest.approx(0.3)


def test_answer_change_rate_normalises():
  # "Three" -> "3" is the same answer; "3" -> "4" and "yes" -> "no" changed.
  assert cm.answer_change_rate(["Three", "3", "yes", "a cat"],
                               ["3", "4", "no", "cat."]) == pytest.approx(0.5)
  with pytest.raises(ValueError, match="same length"):
    cm.answer_change_rate(["a"], ["a", "b"])
  with pytest.raises(ValueError, match="one per answer"):
    cm.vqa_accuracy(["a"], [["a"], ["b"]])
