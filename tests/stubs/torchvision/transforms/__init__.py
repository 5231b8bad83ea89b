"""The transform classes open_clip's transform.py imports; unusable by design."""

import enum


class InterpolationMode(enum.Enum):
  NEAREST = "nearest"
  BILINEAR = "bilinear"
  BICUBIC = "bicubic"


class _Transform:
  """Accepts open_clip's constructor arguments; raises if an image goes through."""

  def __init__(self, *args, **kwargs):
    self.args, self.kwargs = args, kwargs

  def __call__(self, *args, **kwargs):
    raise NotImplementedError("the tests' torchvision stub runs no image transform")


class Normalize(_Transform): pass
class Compose(_Transform): pass
class RandomResizedCrop(_Transform): pass
class ToTensor(_Transform): pass
class Resize(_Transform): pass
class CenterCrop(_Transform): pass
class ColorJitter(_Transform): pass
class Grayscale(_Transform): pass
