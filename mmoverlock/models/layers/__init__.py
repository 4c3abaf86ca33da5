from .basic import GELU, GRN, LayerScale, PointwiseConv2d, ResDWConv, SqueezeExcite
from .dilated_reparam import DilatedReparamBlock
from .glnet_blocks import GLMixBlock, GLNetStage, MHABlock, MHANCHWBlock, MultiheadSelfAttention
from .overlock_blocks import DynamicConvBlock, RepConvBlock

__all__ = ['GELU', 'GRN', 'LayerScale', 'PointwiseConv2d', 'ResDWConv', 'SqueezeExcite',
           'DilatedReparamBlock', 'DynamicConvBlock', 'RepConvBlock', 'GLMixBlock', 'GLNetStage',
           'MHABlock', 'MHANCHWBlock', 'MultiheadSelfAttention']
