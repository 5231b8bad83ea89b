"""The digits source: scikit-learn's data, read without importing scikit-learn."""

import os
import subprocess
import sys

import numpy as np

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
