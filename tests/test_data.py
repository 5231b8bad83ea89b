"""The digits source: scikit-learn's data, read without importing scikit-learn."""

import os
import subprocess
import sys

import numpy as np
import pytest

from prsl_jax import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_digits_equal_scikit_learns_and_load_without_importing_it():
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  images, labels = data.load_digits()
  want = datasets.load_digits()
  np.testing.assert_array_equal(images, want.images)
  np.testing.assert_array_equal(labels, want.target)
  code = ("import sys; from prsl_jax import data; s = data.DigitsSource('test', 8); "
          "print(len(s), 'sklearn' in sys.modules, 'scipy' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
  assert out.stdout.split() == ["359", "False", "False"], out.stderr[-2000:]


def _source(images, labels):
  """A TFDS-like source over in-memory records (as tfds.data_source returns them)."""
  records = [{"image": im, "label": lb} for im, lb in zip(images, labels)]
  return data._TfdsSource(records, 8, "image", "label", None)  # pylint: disable=protected-access


def test_bad_pixels_and_labels_are_named_with_the_first_bad_index():
  good = np.full((6, 6, 3), 0.5, np.float32)
  names = ("a", "b", "c")
  cases = {
      "outside [0, 1]; store images as uint8 0..255 or floats in [0, 1] (0..255 floats: "
      "divide by 255)": good * 400,
      "has NaN or Inf pixels": np.where(np.arange(3) == 1, np.nan, good).astype(np.float32),
      "has label 3, outside the 3 classes 0..2": None,
  }
  for why, bad in cases.items():
    images = [good] * 5 + [good if bad is None else bad] + [good]
    labels = [0] * 5 + [3 if bad is None else 1] + [2]
    src = _source(images, labels)
    with pytest.raises(ValueError, match=r"dataset 'mine' split 'train': example 5 ") as e:
      data.check_split(src, names, name="mine", split="train")
    assert why in str(e.value) and "scanned all 7 examples" in str(e.value)
    # A scan of the evaluation subset only: index 5 outside it passes.
    data.check_split(src, names, name="mine", split="test", indices=[0, 6])
    with pytest.raises(ValueError, match=r"example 5 .*\(scanned 2 of the 7 examples"):
      data.check_split(src, names, name="mine", split="test", indices=[0, 5])
  data.check_split(_source([(good * 255).astype(np.uint8)] * 3, [0, 1, 2]), names, name="m",
                   split="train")
  data.check_split(data.DigitsSource("train", 8), data.DIGIT_NAMES, name="digits",
                   split="train")  # the embedded set is clean


def test_a_huge_training_split_is_scanned_only_at_its_start():
  good = np.zeros((2, 2, 3), np.uint8)
  src = _source([good] * (data.TRAIN_SCAN + 1), [0] * data.TRAIN_SCAN + [7])
  data.check_split(src, ("a",), name="big", split="train")  # the bad last one is not read
  with pytest.raises(ValueError, match=rf"example {data.TRAIN_SCAN} has label 7.*scanned all"):
    data.check_split(src, ("a",), name="big", split="train",
                     indices=range(data.TRAIN_SCAN + 1))


def test_trainer_setup_names_bad_data_before_compute(monkeypatch):
  from prsl_jax import trainer  # pylint: disable=g-import-not-at-top
  from tests import small_config  # pylint: disable=g-import-not-at-top
  good = np.zeros((8, 8, 3), np.uint8)
  bad = _source([good, np.full((8, 8, 3), 255.0, np.float32)] + [good] * 30, [0] * 32)
  monkeypatch.setattr(data, "load", lambda *a, **k: (bad, data.DIGIT_NAMES))
  with pytest.raises(ValueError, match=r"dataset 'digits' split 'train': example 1 has float "
                     r"pixels in \[255, 255\].*scanned all 32"):
    trainer.setup(small_config.get_config())
