"""Test-only reference libraries that need care to import."""

import importlib
import os
import sys

STUBS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stubs")


def open_clip():
  """open_clip_torch, with tests/stubs/torchvision when no working torchvision is there.

  README's test command installs open-clip-torch without its dependencies (its
  torchvision would be PyPI's CUDA build, unusable beside the CPU torch), so
  open_clip's import-time uses of torchvision go to the stub. The stub is seen
  only while open_clip imports: transformers (imported first, so its check for
  torchvision is already made) and everything after see no torchvision.
  """
  importlib.import_module("transformers.utils.import_utils")
  try:
    importlib.import_module("torchvision")
    return importlib.import_module("open_clip")
  except ImportError:
    pass
  sys.path.insert(0, STUBS)
  try:
    return importlib.import_module("open_clip")
  finally:
    sys.path.remove(STUBS)
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
      del sys.modules[name]
