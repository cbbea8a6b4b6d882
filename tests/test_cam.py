"""Our one-pass XGrad-CAM equals pytorch-grad-cam's (forward + backward) on the same weights."""

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAMPlusPlus as LibGradCAMPlusPlus
from pytorch_grad_cam import LayerCAM as LibLayerCAM
from pytorch_grad_cam import XGradCAM as LibXGradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from wsl_models.cam import (
    GradCAM,
    GradCAMPlusPlus,
    LayerCAM,
    LibraryCAM,
    UnknownCAMError,
    XGradCAM,
    cam_method,
    normalize_maps,
    resize_maps,
)
from wsl_models.members import build_member

ATOL = 3e-4


def _trained_like(name: str, classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    member = build_member(name, classes, "none", dropout=0.3)
    # Random BatchNorm statistics so activations look like a trained network's, not init's.
    for m in member.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return member.eval()


@pytest.mark.parametrize(
    "name", ["resnet50", "densenet121", "efficientnet_b0", "efficientnet_lite0", "tiny"]
)
def test_xgradcam_matches_pytorch_grad_cam(name):
    _check_against_library(name, XGradCAM(), LibXGradCAM)


@pytest.mark.parametrize("name", ["resnet50", "densenet121", "efficientnet_lite0"])
def test_gradcam_plusplus_matches_pytorch_grad_cam(name):
    _check_against_library(name, GradCAMPlusPlus(), LibGradCAMPlusPlus)


@pytest.mark.parametrize("name", ["densenet121", "efficientnet_lite0"])
def test_layercam_matches_pytorch_grad_cam(name):
    _check_against_library(name, LayerCAM(), LibLayerCAM)


def _check_against_library(name, method, library_cls):
    member = _trained_like(name)
    x = torch.rand(2, 3, 160, 128)
    ours = method(member, x)  # (B, C, h, w) raw
    with library_cls(model=member, target_layers=[member.target_layer]) as lib:
        for c in range(3):
            expected = lib(input_tensor=x, targets=[ClassifierOutputTarget(c)] * 2)
            # Our serving path: normalise, upsample to the input, normalise (as the library does).
            got = normalize_maps(resize_maps(normalize_maps(ours[:, c]), (160, 128))).numpy()
            # Same raw maps through the library's own scaling, to pin the comparison down.
            lib_scaled = scale_cam_image(scale_cam_image(ours[:, c].numpy(), (128, 160)))
            # float32 sums in another order (the library's gradients, its numpy weights; the
            # thread count changes both): up to 1.1e-4 apart on maps scaled to [0, 1].
            np.testing.assert_allclose(lib_scaled, expected, atol=ATOL)
            assert expected.shape == (2, 160, 128)
            np.testing.assert_allclose(got, expected, atol=ATOL)


def test_xgradcam_shares_one_forward_for_all_classes():
    member = _trained_like("tiny", classes=4)
    x = torch.rand(3, 3, 64, 64)
    features = member.feature_map(x)
    maps = XGradCAM().from_features(features, member.head.weight)
    assert maps.shape == (3, 4, 8, 8)
    assert (maps >= 0).all()
    # Grad-CAM and XGrad-CAM agree after normalisation for a GAP -> linear head.
    g = normalize_maps(GradCAM().from_features(features, member.head.weight))
    xg = normalize_maps(maps)
    assert torch.allclose(g, xg, atol=1e-4)


def test_library_methods_by_name():
    member = _trained_like("tiny", classes=2)
    x = torch.rand(2, 3, 64, 64)
    method = cam_method("lib-layercam")
    assert isinstance(method, LibraryCAM)
    maps = method(member, x)
    assert maps.shape == (2, 2, 64, 64)
    assert float(maps.max()) <= 1.0 + 1e-6 and float(maps.min()) >= 0.0


def test_unknown_cam_method():
    with pytest.raises(UnknownCAMError, match="known"):
        cam_method("magic-cam")


def test_normalize_and_resize():
    maps = torch.tensor([[[0.0, 2.0], [4.0, 8.0]], [[3.0, 3.0], [3.0, 3.0]]])
    n = normalize_maps(maps)
    assert n[0].max() == 1 and n[0].min() == 0
    assert (n[1] == 0).all()  # constant map -> zeros
    r = resize_maps(n, (8, 6))
    assert r.shape == (2, 8, 6)
    assert float(r[0].max()) == pytest.approx(1.0) and float(r[0].min()) == pytest.approx(0.0)
