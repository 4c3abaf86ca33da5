from .backbones import GLNet, OverLoCK
from .classifiers import GLNetClassifier

__all__ = ['GLNet', 'GLNetClassifier', 'OverLoCK']
