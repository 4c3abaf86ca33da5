"""Operators of mmoverlock that PyTorch and the OpenMMLab libraries do not provide."""
from .neighborhood import (
                           available_backends,
                           bias_index,
                           na2d_av_reference,
                           neighborhood_aggregate,
                           relative_position_bias,
                           window_index,
                           window_starts,
)

__all__ = ['available_backends', 'bias_index', 'na2d_av_reference', 'neighborhood_aggregate',
           'relative_position_bias', 'window_index', 'window_starts']
