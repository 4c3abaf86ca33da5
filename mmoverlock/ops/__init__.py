"""Operators of mmoverlock that PyTorch and the OpenMMLab libraries do not provide."""
from .activation import gelu
from .conv_bn_sum import conv_bn_sum
from .depthwise_conv import depthwise_conv2d, depthwise_weight_grad_fft, memory_format_of
from .grn import grn
from .neighborhood import (
    available_backends,
    bias_index,
    na2d_av_reference,
    neighborhood_aggregate,
    relative_position_bias,
    window_index,
    window_starts,
)
from .pointwise_conv import pointwise_conv2d

__all__ = ['available_backends', 'bias_index', 'conv_bn_sum', 'depthwise_conv2d',
           'depthwise_weight_grad_fft', 'gelu', 'grn', 'memory_format_of', 'na2d_av_reference',
           'neighborhood_aggregate', 'pointwise_conv2d', 'relative_position_bias', 'window_index',
           'window_starts']
