"""ImageNet classifiers registered as timm models (importing this module registers them)."""
from .glnet_timm import GLNetClassifier
from .overlock_timm import OverLoCKClassifier

__all__ = ['GLNetClassifier', 'OverLoCKClassifier']
