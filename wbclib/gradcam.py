"""Grad-CAM (Selvaraju et al. 2017): where a classifier looks.

The map of class c at a convolutional layer with activations A_k (k the
channel) is ReLU(sum_k alpha_k A_k), alpha_k the spatial mean of
d logit_c / d A_k; it is upsampled to the input size and scaled to [0, 1].

``target`` is any module whose output is a spatial map (N, C, h, w): the last
convolution of a timm backbone (:func:`last_conv`), or of the trainable head
in the frozen-backbone regime (``crosslab.MapHead``). Transformers whose last
stage keeps a grid of tokens channels-last (N, h, w, C), such as Swin, are
explained at their final norm with a reshape to (N, C, h, w):
:func:`cam_target` picks the layer and the reshape for any backbone, and
:func:`last_conv` refuses them (their only convolution is the patch-embedding
stem, whose map would say nothing about the classifier).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn


class CamTarget(NamedTuple):
    """A Grad-CAM layer and the reshape of its output (and gradient) to (N, C, h, w)."""

    layer: nn.Module
    reshape: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


def channels_last_to_first(t: torch.Tensor) -> torch.Tensor:
    """(N, h, w, C) -> (N, C, h, w): the reshape of a Swin stage's token grid."""
    return t.permute(0, 3, 1, 2)


def _token_model(module: nn.Module) -> Optional[nn.Module]:
    """The transformer inside ``module`` (a timm model with a patch embedding), if any."""
    for m in module.modules():
        if hasattr(m, "patch_embed") and not isinstance(m, nn.Conv2d):
            return m
    return None


def cam_target(module: nn.Module) -> CamTarget:
    """The layer to explain in ``module`` (a backbone, or a model holding one)
    and its reshape: the last convolution of a CNN; for a transformer whose
    features stay a channels-last grid (timm's ``output_fmt == "NHWC"``:
    Swin, SwinV2) its final norm, the grid the classifier pools, reshaped
    with :func:`channels_last_to_first`. A transformer of flat tokens (ViT)
    raises ValueError: its token sequence has no reshape without its grid."""
    transformer = _token_model(module)
    if transformer is None:
        return CamTarget(last_conv(module))
    name = type(transformer).__name__
    if getattr(transformer, "output_fmt", "NCHW") != "NHWC":
        raise ValueError(f"{name} outputs a sequence of tokens, not a spatial map: Grad-CAM here supports "
                         "CNNs and grid transformers (Swin)")
    layer = getattr(transformer, "norm", None)
    if not isinstance(layer, nn.Module) or isinstance(layer, nn.Identity):
        layer = transformer.layers[-1]  # no final norm: the last stage's token grid itself
    return CamTarget(layer, channels_last_to_first)


def last_conv(module: nn.Module) -> nn.Module:
    """The last ``nn.Conv2d`` registered in ``module`` (a CNN); ValueError for
    a transformer, whose only convolution is its patch-embedding stem (use
    :func:`cam_target`)."""
    transformer = _token_model(module)
    if transformer is not None:
        raise ValueError(f"{type(transformer).__name__} is a transformer: its last Conv2d is the patch-embedding "
                         "stem, not a map the classifier reads; use gradcam.cam_target (Swin: the last "
                         "stage's token grid reshaped to a feature map)")
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(module).__name__} has no Conv2d layer for Grad-CAM")
    return convs[-1]


def grad_cam(forward: Callable[[torch.Tensor], torch.Tensor], target: Union[nn.Module, CamTarget],
             x: torch.Tensor, classes: Optional[torch.Tensor] = None, size: Optional[tuple] = None) -> torch.Tensor:
    """Grad-CAM maps (N, H, W) in [0, 1] for inputs ``x``.

    ``forward(x)`` returns logits (N, num_classes) and must run ``target``
    (a module with a (N, C, h, w) output, or a :class:`CamTarget` whose
    reshape makes its output one);
    ``classes`` (N,) picks the explained class per input (default: the
    predicted one). Maps are upsampled to ``size`` (default: ``x``'s spatial
    size) and divided by their maximum (an all-zero map stays zero).
    """
    target, reshape = (target.layer, target.reshape) if isinstance(target, CamTarget) else (target, None)
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
    if reshape is not None:
        activation, gradient = reshape(activation), reshape(gradient)
    weights = gradient.float().mean((2, 3), keepdim=True)
    cam = F.relu((weights * activation.detach().float()).sum(1, keepdim=True))
    size = size or tuple(x.shape[-2:])
    cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return (cam / peak).detach()
