"""torchvision.ops.misc.FrozenBatchNorm2d, which open_clip's utils.py imports (ResNets only)."""


class FrozenBatchNorm2d:

  def __init__(self, *args, **kwargs):
    raise NotImplementedError("the tests' torchvision stub has no FrozenBatchNorm2d")
