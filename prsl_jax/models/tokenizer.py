"""Tiny offline BPE tokenizers built from a word list (no download): CLIP and GPT-2 layouts.

OpenAI's CLIP vocabulary has 49408 entries: the 256 byte symbols, the same 256
with the end-of-word marker `</w>`, 48894 merges, then <|startoftext|> and
<|endoftext|>. `build_word_tokenizer` writes the same layout with only the
merges that spell the given words, so any text still tokenizes (byte by byte
where no merge applies, never to an unknown token) and each listed word usually
becomes a single token. The files load with transformers'
CLIPTokenizerFast.from_pretrained(out_dir), and the ids work with a text tower
whose vocab_size is len(vocab):

  vocab.json               {token: id}; <|endoftext|> has the largest id, so
                           both EOS poolings (legacy argmax and first-EOS) agree
  merges.txt               "#version: 0.2" then one "left right" pair a line
  tokenizer_config.json    special tokens, model_max_length
  special_tokens_map.json
"""

import json
import os

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def bytes_to_unicode():
  """GPT-2/CLIP's reversible byte -> printable unicode character table."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def _symbols(word):
  """The byte-level symbols of a word, the last one marked with </w>."""
  table = bytes_to_unicode()
  syms = [table[b] for b in word.encode("utf-8")]
  syms[-1] += "</w>"
  return syms


def build_word_tokenizer(words, out_dir, model_max_length):
  """Writes a CLIP BPE tokenizer whose merges spell `words`.

  Args:
    words: iterable of words; lower-cased (CLIP's normaliser lower-cases text)
      and split on whitespace.
    out_dir: folder to write the tokenizer files into (created if needed).
    model_max_length: max tokens per text including BOS/EOS; use the text
      tower's max_position_embeddings.

  Returns:
    The vocabulary size (the text tower's vocab_size).
  """
  if not isinstance(model_max_length, int) or model_max_length < 2:
    raise ValueError(f"model_max_length must be an int >= 2 (BOS and EOS), "
                     f"got {model_max_length!r}")
  table = bytes_to_unicode()
  byte_syms = [table[b] for b in range(256)]
  vocab = {s: i for i, s in enumerate(byte_syms + [s + "</w>" for s in byte_syms])}
  merges = []
  seen = set()
  for word in (w for text in words for w in str(text).lower().split()):
    if word in seen:
      continue
    seen.add(word)
    # Merge left to right: ((w o) r) d</w>; each prefix becomes a token.
    syms = _symbols(word)
    cur = syms[0]
    for s in syms[1:]:
      if cur + s not in vocab:
        merges.append((cur, s))
        vocab[cur + s] = len(vocab)
      cur += s
  vocab[BOS] = len(vocab)
  vocab[EOS] = len(vocab)

  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n")
    f.writelines(f"{a} {b}\n" for a, b in merges)
  special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
  with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
    json.dump(special, f, indent=2)
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
               "do_lower_case": True, **special}, f, indent=2)
  return len(vocab)


# ----------------------------------------------------------------------------
# GPT-2 (byte-level BPE, no end-of-word marker) for the captioner's decoder.
# ----------------------------------------------------------------------------

GPT2_EOS = "<|endoftext|>"


def build_gpt2_word_tokenizer(words, out_dir, model_max_length=1024):
  """Writes a GPT-2 byte-level BPE tokenizer whose merges spell `words`.

  GPT-2's layout: the 256 byte symbols, merges, then <|endoftext|> with the
  largest id. GPT-2 has no end-of-word marker; a word after a space is spelled
  with the space byte 'Ġ' in front, so each word gets its own merges (start of
  text) and one more, (Ġ, word). Any text still tokenizes (byte by byte where
  no merge applies, never to an unknown token) and each listed word usually
  becomes one token. Case is kept (GPT-2 does not lower-case).

  As in GPT-2 and nlpconnect/vit-gpt2-image-captioning, <|endoftext|> is the
  BOS, EOS, UNK and PAD token (decoder_start = pad = eos = its id). The files
  load with transformers' GPT2TokenizerFast.from_pretrained(out_dir) or
  AutoTokenizer.from_pretrained(out_dir):

    vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json

  Args:
    words: iterable of texts, split on whitespace into words.
    out_dir: folder to write the tokenizer files into (created if needed).
    model_max_length: max tokens per text (the decoder's n_positions).

  Returns:
    The vocabulary size (<|endoftext|>'s id + 1; the decoder's vocab_size must
    be at least this).
  """
  if not isinstance(model_max_length, int) or model_max_length < 2:
    raise ValueError(f"model_max_length must be an int >= 2, got {model_max_length!r}")
  table = bytes_to_unicode()
  vocab = {table[b]: b for b in range(256)}
  merges = []

  def add(syms):
    # Merge left to right: ((c a) t); each prefix becomes a token.
    cur = syms[0]
    for s in syms[1:]:
      if cur + s not in vocab:
        merges.append((cur, s))
        vocab[cur + s] = len(vocab)
      cur += s

  unique = list(dict.fromkeys(w for text in words for w in str(text).split()))
  # All bare words first, then 'Ġ' + word as one last merge: every bare-word
  # merge then ranks before every 'Ġ' merge, so BPE spells the word first and
  # 'Ġcat' ends as (Ġ, cat) instead of stalling at Ġ, cat when (c, a) outranks
  # (Ġ, c).
  for word in unique:
    add([table[b] for b in word.encode("utf-8")])
  for word in unique:
    add([table[ord(" ")], word])
  vocab[GPT2_EOS] = len(vocab)

  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n")
    f.writelines(f"{a} {b}\n" for a, b in merges)
  special = {"bos_token": GPT2_EOS, "eos_token": GPT2_EOS, "unk_token": GPT2_EOS,
             "pad_token": GPT2_EOS}
  with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
    json.dump(special, f, indent=2)
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length,
               "add_prefix_space": False, **special}, f, indent=2)
  return len(vocab)
