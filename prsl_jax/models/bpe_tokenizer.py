"""CLIP's BPE tokenizer, offline, with open_clip's ids (open_clip folders ship none).

The same algorithm as open_clip's SimpleTokenizer (itself OpenAI CLIP's): ftfy
repair, HTML unescape (twice), whitespace collapse, lower-case, CLIP's
pre-token regex, byte-level BPE with an end-of-word marker, then
[<start_of_text>] + tokens + [<end_of_text>], truncated to the context length
with the last token replaced by <end_of_text>, padded with 0. The vocabulary
(49408 entries: 256 bytes, the same with </w>, 48894 merges, two specials) is
read from the bundled assets/clip_bpe/bpe_simple_vocab_16e6.txt.gz (MIT, see
its NOTICE).

`ClipBpeTokenizer` is called like a transformers tokenizer as far as prsl_jax
uses one (zeroshot.tokenize): tokenizer(texts, padding="max_length",
truncation=True, max_length=L, return_tensors="np") -> {"input_ids",
"attention_mask"} numpy (N, L).
"""

import functools
import gzip
import html
import os

import numpy as np
import regex

from prsl_jax.models import tokenizer

VOCAB_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "assets", "clip_bpe", "bpe_simple_vocab_16e6.txt.gz")
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2  # 49408
SOT, EOT = "<start_of_text>", "<end_of_text>"


@functools.lru_cache(maxsize=1)
def _vocab():
  """(encoder {token: id}, merge ranks {(a, b): rank}) from the bundled file."""
  with gzip.open(VOCAB_FILE) as f:
    lines = f.read().decode("utf-8").split("\n")
  merges = [tuple(m.split()) for m in lines[1:NUM_MERGES + 1]]
  if len(merges) != NUM_MERGES:
    raise ValueError(f"{VOCAB_FILE} holds {len(merges)} merges, CLIP's vocabulary needs "
                     f"{NUM_MERGES}; reinstall prsl_jax")
  byte_syms = list(tokenizer.bytes_to_unicode().values())
  vocab = byte_syms + [s + "</w>" for s in byte_syms] + ["".join(m) for m in merges]
  vocab += [SOT, EOT]
  return {t: i for i, t in enumerate(vocab)}, {m: i for i, m in enumerate(merges)}


def _clean(text):
  try:
    import ftfy  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the CLIP BPE tokenizer repairs text with ftfy, as open_clip does; "
                      "pip install ftfy (requirements.txt pins it)") from e
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return " ".join(text.split()).strip().lower()


_PATTERN = regex.compile(
    SOT + "|" + EOT + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)


class ClipBpeTokenizer:
  """Text -> CLIP BPE ids, equal to open_clip.get_tokenizer(<a CLIP model>)."""

  def __init__(self, context_length=77):
    self.context_length = int(context_length)
    self.encoder, self.ranks = _vocab()
    self.byte_encoder = tokenizer.bytes_to_unicode()
    self.sot_token_id, self.eot_token_id = self.encoder[SOT], self.encoder[EOT]
    self.pad_token_id = 0
    self._cache = {SOT: (SOT,), EOT: (EOT,)}

  def __len__(self):
    return len(self.encoder)

  def _bpe(self, token):
    if token in self._cache:
      return self._cache[token]
    word = tuple(token[:-1]) + (token[-1] + "</w>",)
    while len(word) > 1:
      pairs = set(zip(word[:-1], word[1:]))
      best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = tuple(merged)
    self._cache[token] = word
    return word

  def encode(self, text):
    """One text -> its BPE ids, without start/end tokens."""
    ids = []
    for token in _PATTERN.findall(_clean(text)):
      token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
      ids.extend(self.encoder[t] for t in self._bpe(token))
    return ids

  def tokenize(self, texts, context_length=None):
    """texts -> (N, L) int32 ids exactly as open_clip's tokenizer(texts)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    length = int(context_length or self.context_length)
    if length < 2:
      raise ValueError(f"context_length must be >= 2 (start and end tokens), got {length}")
    out = np.zeros((len(texts), length), np.int32)
    for i, text in enumerate(texts):
      ids = [self.sot_token_id] + self.encode(text) + [self.eot_token_id]
      if len(ids) > length:
        ids = ids[:length]
        ids[-1] = self.eot_token_id
      out[i, :len(ids)] = ids
    return out

  def __call__(self, texts, padding="max_length", truncation=True, max_length=None,
               return_tensors="np"):
    """The transformers-tokenizer call prsl_jax uses: {"input_ids", "attention_mask"}.

    Always pads to max_length (default: the context length) and truncates as
    open_clip does; the mask is 1 up to and including the end token.
    """
    del padding, truncation, return_tensors  # always max_length, truncated, numpy
    ids = self.tokenize(texts, max_length)
    # Tokens run from position 0 to the end token; 0 after it is padding (id 0,
    # '!', can occur inside a text, so the mask comes from the end position).
    end = np.argmax(ids == self.eot_token_id, axis=1)
    mask = (np.arange(ids.shape[1])[None] <= end[:, None]).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask}

  def save_pretrained(self, out_dir):
    """Writes the vocabulary as transformers' CLIPTokenizer files (vocab.json,
    merges.txt, ...), so an open_clip model exported in HF format keeps its
    tokenizer: the ids are OpenAI CLIP's, the specials spelled <|startoftext|>
    and <|endoftext|> (49406, 49407). transformers cleans text without ftfy, so
    ids can differ on text that ftfy would repair."""
    import json  # pylint: disable=g-import-not-at-top
    os.makedirs(out_dir, exist_ok=True)
    names = {SOT: "<|startoftext|>", EOT: "<|endoftext|>"}
    vocab = {names.get(t, t): i for t, i in self.encoder.items()}
    merges = sorted(self.ranks, key=self.ranks.get)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
      json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
      f.write("#version: 0.2\n")
      f.writelines(f"{a} {b}\n" for a, b in merges)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
      json.dump(special, f, indent=2)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
      json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": self.context_length,
                 "do_lower_case": True, **special}, f, indent=2)
    return out_dir
