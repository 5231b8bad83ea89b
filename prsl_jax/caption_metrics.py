"""Scores of generated captions: quality, change under attack, diversity.

    scores = caption_scores(candidates, references)  # {"bleu4": ..., "cider": ...}
    flips = change_rate(clean_captions, adversarial_captions)
    div = diversity(adversarial_captions)

Pure Python/NumPy, no jax. Every function takes plain Python strings, one
caption per image, and tokenizes them itself with `tokenize`, so all metrics
see the same tokens.

Tokenization. COCO caption evaluation tokenizes with Stanford's PTBTokenizer
(Java) and then drops punctuation tokens. Without Java we use a small PTB-like
rule instead: lowercase, replace every character that is neither a letter, a
digit nor whitespace (all punctuation, including "'", "-" and "_") by a space,
split on whitespace. It differs from PTB on clitics and hyphens: "dog's" ->
["dog", "s"] (PTB: "dog", "'s"), "black-and-white" -> ["black", "and",
"white"] (PTB keeps one token). Scores are therefore close to, not identical
with, numbers from the official COCO toolkit.

BLEU-4 and CIDEr-D come from pycocoevalcap (the COCO caption toolkit, pip
`pycocoevalcap`), fed the tokens joined by single spaces; its tokenizer,
METEOR and SPICE need Java and are not used.

  bleu4  corpus BLEU-4 (Papineni et al. 2002) as pycocoevalcap computes it:
         clipped n-gram counts summed over the corpus, for n = 1..4;
         p_n = (correct_n + 1e-15) / (total_n + 1e-9); geometric mean with
         equal weights; brevity penalty exp(1 - r / c) when c < r, where c is
         the total candidate length and r the sum over images of the reference
         length closest to the candidate's (ties: the shorter). The constants
         replace smoothing, so scores are rarely exactly 0 or 1: identical
         text gives about 1 - 1e-9, no 4-gram match ~1e-4 instead of 0, and
         candidates too short to have any 4-gram get p_4 = 1e-6 (3-token
         exact copies score 0.03; sacrebleu gives 0 there).
  cider  CIDEr-D (Vedantam et al. 2015) as pycocoevalcap computes it; see
         `cider` for the formula and why it needs a corpus.

Errors. Bad input raises a one-line ValueError naming the argument: captions
that are not a non-empty list of str, lists of different lengths, a reference,
keyword or target with no tokens.
"""

import math
import re

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

# \w keeps letters and digits of any script; "_" is a word character for re,
# but punctuation for captions.
_NOT_WORD = re.compile(r"[^\w\s]|_")


# ----------------------------------------------------------------------------
# Tokens and argument checks.
# ----------------------------------------------------------------------------


def tokenize(caption: str) -> list[str]:
  """PTB-like tokens of one caption (module docstring): lowercase, no punctuation.

  Args:
    caption: str.

  Returns:
    list of str, possibly empty ("..." -> []).
  """
  if not isinstance(caption, str):
    raise ValueError(f"caption must be a str, got {type(caption).__name__}")
  return _NOT_WORD.sub(" ", caption.lower()).split()


def _check_captions(name: str, captions) -> list[str]:
  """A non-empty list (or tuple) of str, returned as a list."""
  if not isinstance(captions, (list, tuple)):
    raise ValueError(f"{name} must be a list of str, got {type(captions).__name__}")
  if not captions:
    raise ValueError(f"{name} must be a non-empty list of str, got an empty list")
  for i, c in enumerate(captions):
    if not isinstance(c, str):
      raise ValueError(f"{name}[{i}] must be a str, got {type(c).__name__}")
  return list(captions)


def _check_paired(name_a: str, a, name_b: str, b) -> tuple[list[str], list[str]]:
  """Two caption lists, one entry per example each."""
  a, b = _check_captions(name_a, a), _check_captions(name_b, b)
  if len(a) != len(b):
    raise ValueError(f"{name_a} and {name_b} must have the same length (one entry per "
                     f"example), got {len(a)} and {len(b)}")
  return a, b


def _tokenize_nonempty(name: str, text: str) -> list[str]:
  """Tokens of a reference, keyword or target: an empty one would match nothing."""
  tokens = tokenize(text)
  if not tokens:
    raise ValueError(f"{name} has no tokens after tokenize, got {text!r}")
  return tokens


def _coco_inputs(candidates, references) -> tuple[dict, dict]:
  """pycocoevalcap's (gts, res): {image index: [space-joined tokens, ...]}."""
  candidates = _check_captions("candidates", candidates)
  if not isinstance(references, (list, tuple)):
    raise ValueError(f"references must be a list of lists of str, got "
                     f"{type(references).__name__}")
  if len(references) != len(candidates):
    raise ValueError(f"candidates and references must have the same length (one entry "
                     f"per image), got {len(candidates)} and {len(references)}")
  gts, res = {}, {}
  for i, (cand, refs) in enumerate(zip(candidates, references)):
    refs = _check_captions(f"references[{i}]", refs)
    gts[i] = [" ".join(_tokenize_nonempty(f"references[{i}][{j}]", r))
              for j, r in enumerate(refs)]
    # An empty candidate is a legitimate (bad) caption: it scores 0, no error.
    res[i] = [" ".join(tokenize(cand))]
  return gts, res


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
  """The len(tokens) - n + 1 contiguous n-grams of one caption (none if shorter)."""
  return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


# ----------------------------------------------------------------------------
# Quality against references.
# ----------------------------------------------------------------------------


def bleu4(candidates: list[str], references: list[list[str]]) -> float:
  """Corpus BLEU-4 in [0, 1], as pycocoevalcap's Bleu(4) computes it.

  Args:
    candidates: N generated captions, one per image.
    references: N non-empty lists of reference captions; references[i] are
      those of candidates[i]. Each reference needs at least one token.

  Returns:
    float in [0, 1]: one corpus score (counts pooled over images, not a mean
    of per-image scores); rule and its constants in the module docstring.
  """
  gts, res = _coco_inputs(candidates, references)
  score, _ = Bleu(4).compute_score(gts, res, verbose=0)  # verbose=1 prints
  return float(score[3])


def cider(candidates: list[str], references: list[list[str]]) -> float:
  """CIDEr-D averaged over images, as pycocoevalcap's Cider() computes it.

  For image i with M references s_ij and n = 1..4:
    g_n(s) = count of each n-gram in s * idf, idf = log(N) - log(max(1, df)),
      df = the number of the N images whose references contain the n-gram;
    sim_n(c, s) = sum over c's n-grams of min(g_n(c), g_n(s)) * g_n(s)
      / (|g_n(c)| |g_n(s)|) * exp(-(l(c) - l(s))^2 / (2 * 6^2)),
      l = number of tokens - 1 (pycocoevalcap counts bigrams);
    CIDEr-D_i = 10 * mean over n of (sum over j of sim_n(c_i, s_ij)) / M.
  Term counts are raw (the paper divides them by the caption's n-gram count;
  with the clipping min() the two differ).

  The IDF comes from the references of the whole corpus, so the score is only
  meaningful over a corpus, never for one caption: with N = 1 every idf is 0
  and CIDEr is 0 whatever the caption, and an n-gram in every image's
  references (like "a") weighs nothing. Scores of different corpora are not
  comparable.

  Args:
    candidates: N generated captions, one per image.
    references: N non-empty lists of reference captions (each with a token).

  Returns:
    float >= 0, typically in [0, 10]: 10 for a candidate identical to its
    single reference when it has >= 4 tokens and none of its n-grams occurs in
    other images' references (a 3-token copy gets 7.5: no 4-grams).
  """
  gts, res = _coco_inputs(candidates, references)
  score, _ = Cider().compute_score(gts, res)
  return float(score)


def caption_scores(candidates: list[str], references: list[list[str]]) -> dict:
  """{"bleu4": bleu4(...), "cider": cider(...)}: floats, see those functions."""
  return {"bleu4": bleu4(candidates, references), "cider": cider(candidates, references)}


# ----------------------------------------------------------------------------
# Change under attack: clean vs adversarial captions of the same images.
# ----------------------------------------------------------------------------


def change_rate(clean: list[str], adversarial: list[str]) -> float:
  """Fraction in [0, 1] of examples whose tokenized caption changed.

  Args:
    clean: N captions of the clean images.
    adversarial: N captions of the attacked images, in the same order.

  Comparison is on tokens, so case and punctuation changes do not count.
  """
  clean, adversarial = _check_paired("clean", clean, "adversarial", adversarial)
  changed = sum(tokenize(c) != tokenize(a) for c, a in zip(clean, adversarial))
  return changed / len(clean)


def _contains(tokens: list[str], phrase: list[str]) -> bool:
  """phrase occurs in tokens as a contiguous run (whole tokens, no stemming)."""
  return tuple(phrase) in set(_ngrams(tokens, len(phrase)))


def keyword_survival(clean: list[str], adversarial: list[str],
                     keywords: list[str]) -> float:
  """Among examples whose clean caption has its keyword, the fraction that keeps it.

  Args:
    clean: N captions of the clean images.
    adversarial: N captions of the attacked images, in the same order.
    keywords: N keywords, one per example (e.g. its class name). A keyword
      may have several words ("aquarium fish"): it must occur as a contiguous
      run of whole tokens after `tokenize`. No stemming: "dogs" does not
      contain "dog"; pass the form you want to match.

  Returns:
    float in [0, 1], or nan when no clean caption contains its keyword (the
    fraction is undefined: nothing could survive).
  """
  clean, adversarial = _check_paired("clean", clean, "adversarial", adversarial)
  _, keywords = _check_paired("clean", clean, "keywords", keywords)
  kept = eligible = 0
  for i, (c, a, k) in enumerate(zip(clean, adversarial, keywords)):
    phrase = _tokenize_nonempty(f"keywords[{i}]", k)
    if _contains(tokenize(c), phrase):
      eligible += 1
      kept += _contains(tokenize(a), phrase)
  return kept / eligible if eligible else math.nan


def keyword_accuracy(captions: list[str], keywords: list[str]) -> float:
  """Fraction in [0, 1] of captions that contain their keyword (whole tokens after
  `tokenize`, a contiguous run; no stemming), e.g. clean captions naming the class."""
  hits = [_contains(tokenize(c), tokenize(k)) for c, k in zip(captions, keywords)]
  return sum(hits) / len(hits)


def targeted_success_rate(adversarial: list[str], targets: list[str]) -> float:
  """Fraction in [0, 1] of adversarial captions equal to their target, on tokens.

  Args:
    adversarial: N captions of the attacked images.
    targets: N target captions the attack aimed for (each with a token).
  """
  adversarial, targets = _check_paired("adversarial", adversarial, "targets", targets)
  hits = sum(tokenize(a) == _tokenize_nonempty(f"targets[{i}]", t)
             for i, (a, t) in enumerate(zip(adversarial, targets)))
  return hits / len(targets)


# ----------------------------------------------------------------------------
# Diversity of a set of captions (no references).
# ----------------------------------------------------------------------------


def distinct_n(captions: list[str], n: int) -> float:
  """Distinct-n (Li et al. 2016): unique n-grams / all n-grams, over the corpus.

  Args:
    captions: N captions. n-grams never span two captions.
    n: n-gram length, an int >= 1.

  Returns:
    float in (0, 1]: 1 when no n-gram repeats anywhere; nan when no caption
    has n tokens (no n-grams: the ratio is undefined).
  """
  captions = _check_captions("captions", captions)
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"n must be an int >= 1, got {n!r}")
  grams = [g for c in captions for g in _ngrams(tokenize(c), n)]
  return len(set(grams)) / len(grams) if grams else math.nan


def vocabulary_size(captions: list[str]) -> int:
  """Number of distinct tokens over all captions (int >= 0)."""
  captions = _check_captions("captions", captions)
  return len({t for c in captions for t in tokenize(c)})


def mean_length(captions: list[str]) -> float:
  """Mean caption length in tokens (float >= 0)."""
  captions = _check_captions("captions", captions)
  return sum(len(tokenize(c)) for c in captions) / len(captions)


def diversity(captions: list[str]) -> dict:
  """{"distinct_1", "distinct_2", "vocabulary_size", "mean_length"} of captions."""
  return {"distinct_1": distinct_n(captions, 1), "distinct_2": distinct_n(captions, 2),
          "vocabulary_size": vocabulary_size(captions),
          "mean_length": mean_length(captions)}


# ----------------------------------------------------------------------------
# Answers to visual questions (VQA): normalisation, accuracy, change.
# The official VQA evaluation (GT-Vision-Lab/VQA,
# PythonEvaluationTools/vqaEvaluation/vqaEval.py: processPunctuation,
# processDigitArticle, evaluate).
# ----------------------------------------------------------------------------

# vqaEval.py's tables: number words (and 'none') to digits, articles dropped,
# punctuation; its contractions, the common ones ("dont" -> "don't").
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
_PUNCT = (";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@",
          "`", ",", "?")
_CONTRACTIONS = {"aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't",
                 "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hasnt": "hasn't",
                 "havent": "haven't", "isnt": "isn't", "im": "i'm", "ive": "i've",
                 "itll": "it'll", "shouldnt": "shouldn't", "thats": "that's",
                 "theres": "there's", "theyre": "they're", "wasnt": "wasn't",
                 "werent": "weren't", "whats": "what's", "wont": "won't",
                 "wouldnt": "wouldn't", "youre": "you're"}
# vqaEval.py's patterns, as written: a period not followed by a digit goes
# ("(?!<=" is a look-ahead there, not a look-behind); "1,000" keeps its comma.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_answer(answer: str) -> str:
  """An answer as the official VQA evaluation compares it.

  Newlines and tabs to spaces, stripped; punctuation (vqaEval.py's list):
  removed where it touches a space or the text has a digit-comma-digit,
  else replaced by a space; periods not before a digit removed; lowercase;
  number words to digits ("three" -> "3", "none" -> "0"); articles (a, an,
  the) dropped; common contractions restored ("dont" -> "don't").
  E.g. "The Three." -> "3", "a dog's" -> "dog s".
  """
  if not isinstance(answer, str):
    raise ValueError(f"answer must be a str, got {type(answer).__name__}")
  text = answer.replace("\n", " ").replace("\t", " ").strip()
  out = text
  for p in _PUNCT:
    if p + " " in text or " " + p in text or _COMMA_STRIP.search(text):
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  out = _PERIOD_STRIP.sub("", out)
  words = [_NUMBERS.get(w, w) for w in out.lower().split()]
  words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
  return " ".join(words)


def vqa_score(answer: str, references: list[str]) -> float:
  """The VQA accuracy of one answer against its reference answers, in [0, 1].

  With several references (VQA has 10 human answers), the official soft
  accuracy: for each reference, min(1, #other references equal to the answer
  / 3), averaged over the references (the average over every subset of n - 1
  of them). With one reference: 1 if equal, else 0 (the official formula
  would count no match at all). Answer and references are compared after
  normalize_answer (vqaEval.py normalises the references' punctuation only,
  as its annotation files are normalised already; ours may not be).
  """
  refs = _check_captions("references", references)
  ans = normalize_answer(answer)
  refs = [normalize_answer(r) for r in refs]
  if len(refs) == 1:
    return float(ans == refs[0])
  same = sum(r == ans for r in refs)
  return sum(min(1.0, (same - (r == ans)) / 3) for r in refs) / len(refs)


def vqa_accuracy(answers: list[str], references: list[list[str]]) -> float:
  """Mean vqa_score over the examples: answers (N,), references N lists of str."""
  answers = _check_captions("answers", answers)
  if not isinstance(references, (list, tuple)) or len(references) != len(answers):
    raise ValueError("references must be a list of reference-answer lists, one per answer "
                     f"({len(answers)})")
  return sum(vqa_score(a, r) for a, r in zip(answers, references)) / len(answers)


def answer_change_rate(clean: list[str], adversarial: list[str]) -> float:
  """Fraction in [0, 1] of examples whose answer changed after normalize_answer
  ("Three" and "3" are one answer, as the VQA evaluation scores them)."""
  clean, adversarial = _check_paired("clean", clean, "adversarial", adversarial)
  changed = sum(normalize_answer(c) != normalize_answer(a) for c, a in zip(clean, adversarial))
  return changed / len(clean)
