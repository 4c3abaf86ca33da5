"""The check at the top of the backbones' ``forward``: a non-empty batch of 3-channel images.

Without it an empty batch fails deep inside a block (``cannot reshape tensor of 0 elements into
shape [0, 8, 16, -1]``) and a 1- or 4-channel image in the stem's first convolution, neither of
which names the input as the cause. The check reads only the tensor's shape (no data, no device
synchronisation). ``torch.compile`` evaluates it while tracing (shapes are known then, also with
``dynamic=True``), so it adds no operation and, for a good batch, no graph break (``fullgraph=True``
works). ``torch.jit.trace`` (and the ONNX export built on it) records sizes as traced values, so
the check is skipped there instead of warning and baking in the example's shape.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ['ImageBatchError', 'check_image_batch']


class ImageBatchError(ValueError):
    """A backbone was given something other than a non-empty ``(N, C, H, W)`` batch of images."""


def check_image_batch(x: Tensor, owner: str, channels: int = 3) -> None:
    """Require ``x`` to be a ``(N, channels, H, W)`` tensor with ``N >= 1``.

    Args:
        x: the backbone's input.
        owner: the backbone's name, for the message.
        channels: the number of channels the backbone's stem takes.

    Raises:
        ImageBatchError: naming the shape, the cause and the fix.
    """
    if torch.jit.is_tracing():
        return
    shape = tuple(x.shape)
    if len(shape) != 4:
        raise ImageBatchError(
            f'{owner} takes a batch of images shaped (N, {channels}, H, W), got a '
            f'{len(shape)}-D tensor of shape {shape}: add the batch dimension (x[None]) to a '
            'single image, or stack the images into one tensor.')
    if shape[0] == 0:
        raise ImageBatchError(
            f'{owner} got an empty batch (input shape {shape}): at least one image is needed. '
            'Check that the data loader yields images (the dataset may be empty, or its filter '
            'may have removed every image) or that the list of images passed in is not empty.')
    if shape[1] != channels:
        raise ImageBatchError(
            f'{owner} takes {channels}-channel (RGB) images, got {shape[1]} channels (input '
            f'shape {shape}): convert the images to 3 channels (e.g. drop an alpha channel, or '
            "repeat a grayscale one; mmcv's LoadImageFromFile does with color_type='color'), or "
            'check that the tensor is laid out as (N, C, H, W), not (N, H, W, C).')
