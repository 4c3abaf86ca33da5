from .backbones import OverLoCK

__all__ = ['OverLoCK']
