"""Hides torch from a test's subprocess (on its PYTHONPATH via tests/processes.py).

requirements.txt does not install torch; the tests install it for the PyTorch
references only. A None entry in sys.modules makes `import torch` fail and
importlib.util.find_spec("torch") return None, so transformers sees what a
user's install has: no torch.
"""

import sys

sys.modules["torch"] = None
