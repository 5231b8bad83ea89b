"""Data: the embedded digits, TFDS data sources, and the grain pipelines over them.

Every source is random access (len, getitem) and yields dicts of numpy arrays:
  image: float32 (S, S, 3) in [0, 1] at the model's resolution S (CLIP
    preprocessing applied; normalisation happens inside the model),
  label: int32 class index,
  caption: str (only for sources with captions: the digits, TFDS caption sets).

The training stream is defined on the *global* batch: global step s holds
examples perm[s*B : (s+1)*B] of a seeded per-epoch permutation, and process p of
P reads rows [p*B/P, (p+1)*B/P) of it. So the examples in a step do not depend on
how many hosts or devices read them, which is what makes 1 device and 8 devices,
or 1 process and 2, train on the same numbers.
"""

import functools
import os

import grain
import numpy as np

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
               "nine")
# Captions for contrastive pretraining/fine-tuning on the digits. The first is the
# zero-shot prompt; the others keep the text tower from matching one string only.
DIGIT_CAPTIONS = (
    "This is a photo of a {}",
    "a handwritten {}",
    "the digit {}",
    "a picture of the number {}",
    "a small blurry {}",
    "a white {} on black",
)
# Visual questions about the digits, answered by the digit's name: the prompt
# (teacher-forced, no loss) ends at ANSWER_MARK, the answer follows it. The tiny
# BLIP-2 (scripts/pretrain_tiny_blip2.py) was pretrained on these.
ANSWER_MARK = "Answer:"
DIGIT_QUESTIONS = (
    "Question: what digit is this? Answer:",
    "Question: which number is written here? Answer:",
    "Question: what number does the image show? Answer:",
)
# As caption templates ('{}' = the digit's name): question, then answer.
DIGIT_VQA = tuple(q + " {}" for q in DIGIT_QUESTIONS)
_DIGITS_TEST_FRACTION = 0.2


def load_digits():
  """scikit-learn's digits: (images (1797, 8, 8) float64 in 0..16, labels (1797,) int).

  Reads the CSV that scikit-learn ships (what sklearn.datasets.load_digits
  parses) without importing scikit-learn, whose import (with SciPy) costs about
  3 s of every run's start-up; falls back to load_digits if the file moved.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("sklearn")
  path = None if spec is None or spec.origin is None else os.path.join(
      os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz")
  if path is None or not os.path.isfile(path):
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    return digits.images, digits.target
  data = np.loadtxt(path, delimiter=",")
  return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


class DigitsSource:
  """scikit-learn's 1,797 handwritten digits (8x8, 16 grey levels) as RGB images.

  A fixed permutation (seed 0) splits them 80/20 into 'train' and 'test'; images
  are upscaled bilinearly to `image_size` and replicated over 3 channels.
  """

  def __init__(self, split: str, image_size: int):
    if split not in ("train", "test"):
      raise ValueError(f"digits split must be 'train' or 'test', got {split!r}")
    if image_size < 8:
      raise ValueError(f"image_size must be >= 8 for the digits, got {image_size}")
    images, target = load_digits()
    order = np.random.RandomState(0).permutation(len(target))
    n_test = int(round(_DIGITS_TEST_FRACTION * len(order)))
    idx = order[n_test:] if split == "train" else order[:n_test]
    self._images = (images[idx] / 16.0).astype(np.float32)  # (N, 8, 8)
    self._labels = target[idx].astype(np.int32)
    self.image_size = image_size

  def __len__(self):
    return len(self._labels)

  def __getitem__(self, i):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    img = Image.fromarray(self._images[i], mode="F").resize(
        (self.image_size, self.image_size), Image.BILINEAR)
    img = np.clip(np.asarray(img, np.float32), 0.0, 1.0)
    label = self._labels[i]
    return {"image": np.repeat(img[:, :, None], 3, axis=-1), "label": np.int32(label),
            "caption": DIGIT_NAMES[label]}

  @property
  def labels(self):
    return self._labels

  def raw(self, i):
    """(image as stored, label) of example i, before preprocessing (`check_examples`)."""
    return self._images[i], int(self._labels[i])

  def references(self, i):
    """Reference captions of example i: its class name in every caption template."""
    return [t.format(DIGIT_NAMES[self._labels[i]]) for t in DIGIT_CAPTIONS]

  def keyword(self, i):
    """The word a caption of example i should contain: its class name."""
    return DIGIT_NAMES[self._labels[i]]

  def answers(self, i):
    """Reference answers of example i to DIGIT_QUESTIONS: its class name."""
    return [DIGIT_NAMES[self._labels[i]]]


class VqaJsonlSource:
  """A visual-question-answering set in a JSON-lines file (no TFDS builder has VQA).

  One example a line: {"image": path (relative to the file's folder, or
  absolute), "question": "what is the man holding?", "answers": ["frisbee",
  ...]} (VQA v2 gives 10 answers a question; Visual Genome QA one). Convert
  VQA v2's or Visual Genome's annotations to it with a few lines of Python.
  Each example's caption (the training text) is "Question: {question} Answer:
  {answer}" with its most frequent answer (ties: the first); `question(i)` is
  the prompt the evaluation asks, `answers(i)` the references of its VQA
  accuracy. Images are read with PIL and resized as CLIP's (preprocessing).
  """

  def __init__(self, path: str, image_size: int):
    import json  # pylint: disable=g-import-not-at-top
    if not os.path.isfile(path):
      raise ValueError(f"no VQA file {path!r}: data.name 'vqa_jsonl' reads "
                       "<data.data_dir>/<split>.jsonl (see VqaJsonlSource)")
    self._folder, self.image_size = os.path.dirname(os.path.abspath(path)), image_size
    self._rows = []
    with open(path) as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        row = json.loads(line)
        if not (isinstance(row.get("image"), str) and isinstance(row.get("question"), str)
                and isinstance(row.get("answers"), list) and row["answers"]):
          raise ValueError(f"{path}:{n}: a line needs 'image' (str), 'question' (str) and "
                           f"'answers' (a non-empty list of str), got keys {sorted(row)}")
        self._rows.append(row)

  def __len__(self):
    return len(self._rows)

  def _image(self, i):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(os.path.join(self._folder, self._rows[i]["image"])) as img:
      return np.asarray(img.convert("RGB"))

  def raw(self, i):
    return self._image(i), None

  def __getitem__(self, i):
    from prsl_jax import preprocessing  # pylint: disable=g-import-not-at-top
    answers = [str(a) for a in self._rows[i]["answers"]]
    best = max(answers, key=answers.count)  # max keeps the first of equal counts
    return {"image": preprocessing.clip_preprocess(self._image(i), self.image_size),
            "caption": f"{self.question(i)} {best}"}

  def question(self, i):
    """The prompt of example i: 'Question: ... Answer:' (ends with ANSWER_MARK)."""
    return f"Question: {self._rows[i]['question'].strip()} {ANSWER_MARK}"

  def answers(self, i):
    return [str(a) for a in self._rows[i]["answers"]]


class _TfdsSource:
  """A tfds.data_source with CLIP preprocessing applied on read."""

  def __init__(self, source, image_size, image_key, label_key, caption_fn,
               references_fn=None):
    self._source, self._size = source, image_size
    self._image_key, self._label_key, self._caption_fn = image_key, label_key, caption_fn
    if references_fn is not None:
      # Captions to score generated ones against (read without decoding the image).
      self.references = lambda i: references_fn(self._source[i])

  def __len__(self):
    return len(self._source)

  def raw(self, i):
    """(image as stored, label or None) of example i, before preprocessing."""
    rec = self._source[i]
    label = None if self._label_key is None else int(rec[self._label_key])
    return np.asarray(rec[self._image_key]), label

  def __getitem__(self, i):
    from prsl_jax import preprocessing  # pylint: disable=g-import-not-at-top
    rec = self._source[i]
    out = {"image": preprocessing.clip_preprocess(rec[self._image_key], self._size)}
    if self._label_key is not None:
      out["label"] = np.int32(rec[self._label_key])
    if self._caption_fn is not None:
      out["caption"] = self._caption_fn(rec)
    return out


def _coco_references(rec):
  return [t.decode() if isinstance(t, bytes) else str(t) for t in rec["captions"]["text"]]


def _coco_caption(rec):
  # The first of COCO's (about five) captions: a fixed training target.
  return _coco_references(rec)[0]


# Per-dataset record layout for TFDS sets whose keys are not image/label.
_TFDS_KEYS = {
    "coco_captions": dict(image_key="image", label_key=None, caption_fn=_coco_caption,
                          references_fn=_coco_references),
}


def load(name: str, split: str, *, image_size: int, data_dir=None):
  """Returns (source, class_names) for the digits or a TFDS dataset.

  Args:
    name: 'digits' (embedded, no download), 'vqa_jsonl' (questions and answers
      in `data_dir`/`split`.jsonl, VqaJsonlSource) or a TFDS name ('cifar10',
      ...), which must already be prepared as ArrayRecord in `data_dir`
      (nothing is downloaded here; see `prepare`).
    split: 'train'/'test' or any TFDS split string.
    image_size: the model's input resolution S.
    data_dir: TFDS data directory (None: TFDS's default).

  Returns:
    source: random-access sequence of dicts (see module docstring).
    class_names: tuple of str, or None for caption-only datasets.
  """
  if name == "digits":
    return DigitsSource(split, image_size), DIGIT_NAMES
  if name == "vqa_jsonl":
    return VqaJsonlSource(os.path.join(data_dir or ".", f"{split}.jsonl"), image_size), None
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # TFDS raises several types for a missing dataset.
    raise not_available_error(name, split, data_dir, e) from e
  keys = _TFDS_KEYS.get(name.split(":")[0].split("/")[0],
                        dict(image_key="image", label_key="label", caption_fn=None))
  class_names = None
  if keys["label_key"] is not None:
    from prsl_jax import classnames  # pylint: disable=g-import-not-at-top
    features = src.dataset_info.features
    feature = features[keys["label_key"]] if keys["label_key"] in features else None
    if getattr(feature, "names", None) is None:
      kind = "no 'label' feature" if feature is None else (
          f"a 'label' feature of type {type(feature).__name__}")
      raise ValueError(f"TFDS dataset {name!r} has {kind}, not a ClassLabel with class "
                       "names; zero-shot classification needs them: use a dataset whose "
                       "'label' is a tfds.features.ClassLabel")
    class_names = classnames.get(name, feature.names)
  return _TfdsSource(src, image_size, **keys), class_names


def prepare_command(name: str, data_dir=None) -> str:
  """The shell command that prepares a TFDS dataset the way `load` reads it."""
  dd = f", data_dir={data_dir!r}" if data_dir else ""
  return (f"python -c \"from prsl_jax import data; data.prepare({name!r}{dd})\"")


def not_available_error(name, split, data_dir, e) -> Exception:
  """The one-line error for a TFDS dataset tfds.data_source cannot open, with the fix."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  text = " ".join(str(e).split())
  if isinstance(e, tfds.core.registered.DatasetNotFoundError) or "not found" in text[:200]:
    import difflib  # pylint: disable=g-import-not-at-top
    try:
      close = difflib.get_close_matches(name.split("/")[0].split(":")[0],
                                        tfds.list_builders(with_community_datasets=False), n=3)
    except Exception:  # pylint: disable=broad-except
      close = []
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ValueError(f"unknown dataset {name!r}{hint}: give 'digits' (embedded) or the "
                      "name of a TFDS dataset prepared as ArrayRecord")
  import re  # pylint: disable=g-import-not-at-top
  at = re.search(r"already prepared at (\S+) in the FileFormat.TFRECORD", text)
  if at and os.path.isdir(at.group(1)) and any(".tfrecord" in f for f in os.listdir(at.group(1))):
    return FileNotFoundError(
        f"TFDS dataset {name!r} in data_dir={data_dir!r} is prepared as TFRecord, which "
        f"tfds.data_source cannot read; delete {at.group(1)} (or choose another data_dir) "
        f"and prepare it as ArrayRecord: {prepare_command(name, data_dir)}")
  return FileNotFoundError(
      f"TFDS dataset {name!r} split {split!r} is not prepared in data_dir={data_dir!r} "
      f"(prsl_jax never downloads data at run time); prepare it once as ArrayRecord: "
      f"{prepare_command(name, data_dir)} (TFDS needs tensorflow to write most datasets: "
      "pip install tensorflow-cpu)" + ("" if "TFRECORD" in text else f". TFDS said: {text[:300]}"))


def prepare(name: str, *, data_dir=None, **builder_kwargs):
  """Downloads and prepares a TFDS dataset in the format `load` reads (ArrayRecord).

  `tfds build NAME` writes TFRecord by default, which tfds.data_source refuses,
  and in TFDS 4.9 its command line also needs apache_beam and tensorflow. This
  is the builder API with file_format="array_record". Writing images encoded
  from arrays (cifar10 and most image sets) needs tensorflow installed
  (`pip install tensorflow-cpu`); prsl_jax itself never imports it.

  Args:
    name: TFDS name, e.g. "cifar10" or "cifar10:3.0.2".
    data_dir: where to write (None: TFDS's default, ~/tensorflow_datasets).
    **builder_kwargs: passed to tfds.builder (e.g. config=...).

  Returns:
    the builder's data_dir (the prepared version's folder).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record",
                         **builder_kwargs)
  try:
    builder.download_and_prepare()
  except ModuleNotFoundError as e:
    if e.name and e.name.split(".")[0] == "tensorflow":
      raise ModuleNotFoundError(
          f"preparing {name!r} needs tensorflow (TFDS encodes its images with it): "
          "pip install tensorflow-cpu, then run this again", name=e.name) from e
    raise
  return builder.data_dir


def check_available(name: str, split: str, *, data_dir=None):
  """Fails fast, with the fix, if `name`/`split` cannot be read (no image is decoded)."""
  if name == "digits":
    if split not in ("train", "test"):
      raise ValueError(f"digits split must be 'train' or 'test', got {split!r}")
    return
  load(name, split, image_size=8, data_dir=data_dir)


class _GlobalToLocal:
  """Random access to this process's rows of the global batch stream."""

  def __init__(self, stream, global_batch, process_index, process_count):
    self._stream = stream
    self._b = global_batch // process_count
    self._global_batch = global_batch
    self._offset = process_index * self._b

  def __len__(self):
    return len(self._stream) // self._global_batch * self._b

  def __getitem__(self, t):
    g = (t // self._b) * self._global_batch + self._offset + t % self._b
    return self._stream[g]


def _add_caption(example, index, *, seed, templates):
  # A caption template picked by (seed, global position): reproducible, and a new
  # draw each epoch because the position keeps growing.
  if "caption" in example and templates:
    rng = np.random.default_rng([seed, index])
    example = dict(example, caption=templates[rng.integers(len(templates))].format(
        example["caption"]))
  return example


def train_iterator(source, *, global_batch_size, seed, process_index=0, process_count=1,
                   caption_templates=(), tokenize=None):
  """An infinite, checkpointable iterator of this process's share of each global batch.

  Args:
    source: random-access source from `load`.
    global_batch_size: B, summed over all processes; must divide by process_count.
    seed: shuffling seed; epoch e uses a different permutation of the source.
    process_index, process_count: this host and the number of hosts.
    caption_templates: templates '{}'-formatted with the example's caption (the
      digits carry their class name as caption); () keeps captions as they are.
    tokenize: optional fn(list[str]) -> {name: (n, L) int array} applied to the
      batch's captions, adding those arrays to the batch (e.g. input_ids and
      attention_mask); without it, captions are dropped (batches hold only
      arrays that can go to devices).

  Returns:
    grain DatasetIterator of dicts of numpy arrays with leading dim B / process_count;
    get_state()/set_state() save and restore its position.
  """
  if global_batch_size % process_count:
    raise ValueError(
        f"global batch size {global_batch_size} must be divisible by the number of "
        f"processes {process_count}")
  if len(source) < global_batch_size:
    raise ValueError(
        f"global batch size {global_batch_size} is larger than the dataset ({len(source)})")
  # repeat-then-shuffle: grain reshuffles each epoch with a seed derived from ours.
  stream = grain.MapDataset.source(source).repeat(None).shuffle(seed=seed)
  stream = stream.map_with_index(
      lambda i, ex: _add_caption(ex, i, seed=seed, templates=caption_templates))
  local = grain.MapDataset.source(
      _GlobalToLocal(stream, global_batch_size, process_index, process_count))
  local = local.batch(global_batch_size // process_count, drop_remainder=True,
                      batch_fn=functools.partial(_collate, tokenize=tokenize))
  return iter(local.to_iter_dataset())


def _collate(examples, tokenize=None):
  out = {k: np.stack([ex[k] for ex in examples]) for k in examples[0] if k != "caption"}
  # Strings cannot go to devices: captions leave the pipeline tokenized or not at all.
  if "caption" in examples[0] and tokenize is not None:
    out.update(tokenize([ex["caption"] for ex in examples]))
  return out


def eval_indices(num_total: int, num_examples, seed: int):
  """A fixed seeded subset of range(num_total), sorted; all of it if num_examples is None."""
  if num_examples is None or num_examples >= num_total:
    return np.arange(num_total)
  if num_examples < 1:
    raise ValueError(f"num_examples must be >= 1, got {num_examples}")
  return np.sort(np.random.default_rng(seed).choice(num_total, num_examples, replace=False))


def eval_batches(source, indices, batch_size: int):
  """Yields fixed-size batches over source[indices], padded, with a bool 'mask' (b,).

  Fixed size so a jitted eval compiles once; padded rows repeat the last example
  and have mask False.
  """
  for start in range(0, len(indices), batch_size):
    chunk = list(indices[start:start + batch_size])
    n = len(chunk)
    chunk += [chunk[-1]] * (batch_size - n)
    batch = _collate([source[int(i)] for i in chunk])
    batch["mask"] = np.arange(batch_size) < n
    yield batch


# Examples `check_split` reads as stored, at most: the first of a training split,
# the first of an evaluation subset (a scan of a huge set, decoding every image,
# would cost more than a short run; the message says how many were read).
TRAIN_SCAN = 512
EVAL_SCAN = 2048


def _bad_example(image, label, num_classes):
  """Why one stored example cannot be used, or None."""
  if np.issubdtype(image.dtype, np.floating):
    finite = np.isfinite(image)
    if not finite.all():
      return "has NaN or Inf pixels"
    lo, hi = (float(image.min()), float(image.max())) if image.size else (0.0, 0.0)
    if lo < 0.0 or hi > 1.0:
      return (f"has float pixels in [{lo:g}, {hi:g}], outside [0, 1]; store images as "
              "uint8 0..255 or floats in [0, 1] (0..255 floats: divide by 255)")
  elif image.dtype != np.uint8:
    return f"has {image.dtype} pixels; images must be uint8 (0..255) or float in [0, 1]"
  if label is not None and num_classes is not None and not 0 <= label < num_classes:
    return (f"has label {label}, outside the {num_classes} classes 0..{num_classes - 1}; "
            "fix the labels or the class list")
  return None


def check_split(source, class_names, *, name, split, indices=None):
  """`check_examples` of the first EVAL_SCAN of `indices` (None: the first TRAIN_SCAN
  examples of a training split)."""
  indices = list(range(min(len(source), TRAIN_SCAN)) if indices is None else
                 indices[:EVAL_SCAN])
  check_examples(source, indices, num_classes=len(class_names) if class_names else None,
                 name=name, split=split)


def check_examples(source, indices, *, num_classes, name, split):
  """Raises ValueError, before any compute, for the first example of `indices`
  with pixels outside [0, 1] (floats), NaN/Inf pixels or a label outside the classes.

  Reads the examples as stored (`source.raw`; sources without it are skipped).

  Args:
    source: from `load`.
    indices: the examples to read (the first of those about to be used; the
      message says how many were read of the split).
    num_classes: len(class_names), or None (no labels).
    name, split: for the message.
  """
  raw = getattr(source, "raw", None)
  if raw is None:
    return
  indices = [int(i) for i in indices]
  for i in indices:
    image, label = raw(i)
    why = _bad_example(np.asarray(image), label, num_classes)
    if why is not None:
      scope = (f"all {len(indices)}" if len(indices) == len(source) else
               f"{len(indices)} of the {len(source)}")
      raise ValueError(f"dataset {name!r} split {split!r}: example {i} {why} (scanned "
                       f"{scope} examples, the first of those about to be used; stopped at "
                       "the first bad one)")
