"""Grad-CAM on Swin: the last stage's token grid, reshaped to a feature map,
in the image's orientation; a clear error where a layer cannot be explained."""
from __future__ import annotations

import pytest
import timm
import torch

from wbclib.gradcam import CamTarget, cam_target, channels_last_to_first, grad_cam, last_conv

SWIN = "swin_tiny_patch4_window7_224"  # timm's smallest Swin at its native 224 px: a 7 x 7 last stage


@pytest.fixture(scope="module")
def swin():
    torch.manual_seed(0)
    return timm.create_model(SWIN, pretrained=False, num_classes=0).eval()


def test_last_conv_refuses_a_transformer_instead_of_its_stem(swin):
    # Swin's only Conv2d is the 4x4 patch embedding: a map there ignores every attention block.
    with pytest.raises(ValueError, match="patch-embedding stem.*cam_target"):
        last_conv(swin)


def test_swin_target_is_the_final_norm_of_the_last_stage(swin):
    target = cam_target(swin)
    assert target.layer is swin.norm and target.reshape is channels_last_to_first
    with torch.no_grad():
        grid = swin.forward_features(torch.zeros(1, 3, 224, 224))
    assert tuple(target.reshape(grid).shape) == (1, swin.num_features, 7, 7)


def test_swin_cam_peaks_on_the_token_the_score_reads(swin):
    """A score that reads one token (row 1, column 5) of the last stage: its
    Grad-CAM weights are that token's features / 49, so the map at a token
    is the dot product with it. The final LayerNorm (unit scale, zero shift
    at init) gives every token the same norm, so by Cauchy-Schwarz the map
    peaks exactly there; a transposed reshape would peak at (5, 1)."""
    row, col = 1, 5
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        token = swin.forward_features(x)[0, row, col].clone()
    reader = torch.zeros(7, 7, swin.num_features)
    reader[row, col] = token

    def score(images):
        return (swin.forward_features(images) * reader).sum((1, 2, 3))[:, None]

    coarse = grad_cam(score, cam_target(swin), x, classes=torch.zeros(1, dtype=torch.long), size=(7, 7))
    assert coarse.shape == (1, 7, 7)
    assert divmod(int(coarse[0].argmax()), 7) == (row, col)
    full = grad_cam(score, cam_target(swin), x, classes=torch.zeros(1, dtype=torch.long))
    assert full.shape == (1, 224, 224) and float(full.max()) == pytest.approx(1.0) and float(full.min()) >= 0
    peak_row, peak_col = divmod(int(full[0].argmax()), 224)
    assert (peak_row // 32, peak_col // 32) == (row, col)  # inside that token's 32 x 32 patch


def test_a_cnn_target_is_its_last_conv_and_a_bare_module_still_works():
    torch.manual_seed(0)
    cnn = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    target = cam_target(cnn)
    assert target == CamTarget(last_conv(cnn)) and target.reshape is None
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(grad_cam(cnn, target, x), grad_cam(cnn, last_conv(cnn), x))


def test_a_flat_token_transformer_is_refused():
    vit = timm.create_model("test_vit", pretrained=False, num_classes=0)
    with pytest.raises(ValueError, match="sequence of tokens"):
        cam_target(vit)
