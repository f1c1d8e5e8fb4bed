"""Grad-CAM (Selvaraju et al. 2017): where a classifier looks.

The map of class c at a convolutional layer with activations A_k (k the
channel) is ReLU(sum_k alpha_k A_k), alpha_k the spatial mean of
d logit_c / d A_k; it is upsampled to the input size and scaled to [0, 1].

``target`` is any module whose output is a spatial map (N, C, h, w): the last
convolution of a timm backbone (:func:`last_conv`), or of the trainable head
in the frozen-backbone regime (``crosslab.MapHead``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


def last_conv(module: nn.Module) -> nn.Module:
    """The last ``nn.Conv2d`` registered in ``module``."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(module).__name__} has no Conv2d layer for Grad-CAM")
    return convs[-1]


def grad_cam(forward: Callable[[torch.Tensor], torch.Tensor], target: nn.Module, x: torch.Tensor,
             classes: Optional[torch.Tensor] = None, size: Optional[tuple] = None) -> torch.Tensor:
    """Grad-CAM maps (N, H, W) in [0, 1] for inputs ``x``.

    ``forward(x)`` returns logits (N, num_classes) and must run ``target``;
    ``classes`` (N,) picks the explained class per input (default: the
    predicted one). Maps are upsampled to ``size`` (default: ``x``'s spatial
    size) and divided by their maximum (an all-zero map stays zero).
    """
    store = {}

    def hook(_, __, output):
        store["activation"] = output

    handle = target.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = forward(x)
            if "activation" not in store:
                raise RuntimeError("the forward function never ran the Grad-CAM target layer")
            if classes is None:
                classes = logits.argmax(1)
            score = logits.gather(1, classes.view(-1, 1).to(logits.device)).sum()
            activation = store["activation"]
            gradient, = torch.autograd.grad(score, activation)
    finally:
        handle.remove()
    weights = gradient.float().mean((2, 3), keepdim=True)
    cam = F.relu((weights * activation.detach().float()).sum(1, keepdim=True))
    size = size or tuple(x.shape[-2:])
    cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return (cam / peak).detach()
