"""Drop-in fused versions of torchvision's ResNet family (see docs/models.md)."""
from fastres.models import resnet as _resnet
from fastres.models.resnet import *  # noqa: F401,F403  (the names of resnet.__all__)

__all__ = list(_resnet.__all__)
