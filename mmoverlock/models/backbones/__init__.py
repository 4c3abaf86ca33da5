from .glnet import GLNet
from .overlock import OverLoCK

__all__ = ['GLNet', 'OverLoCK']
