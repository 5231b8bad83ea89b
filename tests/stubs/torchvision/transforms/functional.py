"""torchvision.transforms.functional: empty; the tests call none of open_clip's transforms."""
