"""A stand-in for torchvision, for open_clip_torch in the tests only.

PyPI's torchvision wheels are built against CUDA torch, and the suite uses the
CPU torch: with both installed, `import torchvision` fails, and transformers,
which imports torchvision when it is installed, fails with it. So the tests
install open-clip-torch without its dependencies (README's test command) and
give open_clip, when no working torchvision is there, this stub of the names
open_clip imports at import time. The tests build models and call their
forward passes on tensors; none of them runs open_clip's image transforms,
whose constructors here accept anything and whose calls raise.
"""
