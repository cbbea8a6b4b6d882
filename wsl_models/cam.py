"""Class activation maps.

For a GAP -> linear head, d y_c / d A_k(i, j) = W_ck / (h w) everywhere, so gradient-based
CAM methods whose weights only use that gradient are closed-form in the feature map: all
classes of a member come from ONE forward pass, no backward. Each method is a subclass that
overrides ``channel_weights`` (the pytorch-grad-cam pattern). Methods that need more (Grad-CAM++
on other heads, Score-CAM, EigenCAM, LayerCAM at other layers) run through pytorch-grad-cam by name.
"""

from __future__ import annotations

import torch

from .members import Member

EPS = 1e-7  # pytorch-grad-cam's XGrad-CAM epsilon, kept so both agree to float precision


class UnknownCAMError(ValueError):
    pass


class AnalyticCAM:
    """Base class: maps = ReLU(sum_k alpha_bck A_bk) from the feature map alone."""

    name = "cam"
    needs_backward = False

    def channel_weights(self, features: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w), (C, K) -> (B, C, K). Plain CAM: the head weights themselves."""
        return head_weight.unsqueeze(0).expand(features.shape[0], -1, -1)

    def from_features(self, features: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised, non-negative) maps for every class: (B, C, h, w)."""
        alpha = self.channel_weights(features, head_weight)
        return torch.relu(torch.einsum("bck,bkhw->bchw", alpha, features))

    def __call__(self, member: Member, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.from_features(member.feature_map(images), member.head.weight)


class GradCAM(AnalyticCAM):
    name = "gradcam"

    def channel_weights(self, features: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
        h, w = features.shape[-2:]
        return super().channel_weights(features, head_weight) / (h * w)


class XGradCAM(AnalyticCAM):
    """alpha_ck = sum_ij A_k(ij) / (sum_ij A_k + eps) * dy_c/dA_k(ij)  (Fu et al., BMVC 2020)."""

    name = "xgradcam"

    def channel_weights(self, features: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
        h, w = features.shape[-2:]
        sums = features.sum(dim=(2, 3))  # (B, K)
        share = sums / (sums + EPS)
        return head_weight.unsqueeze(0) / (h * w) * share.unsqueeze(1)


class GradCAMPlusPlus(AnalyticCAM):
    """Grad-CAM++ (Chattopadhay et al. 2018) with pytorch-grad-cam's epsilon, in closed form.

    With a constant gradient g = W_ck / (h w): a = g^2 / (2 g^2 + S_k g^3 + eps), and
    alpha_ck = sum_ij relu(g) a = h w relu(g) a. Only positively weighted channels count.
    """

    name = "gradcam++"
    eps = 1e-6

    def channel_weights(self, features: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
        h, w = features.shape[-2:]
        g = (head_weight / (h * w)).unsqueeze(0)  # (1, C, K)
        sums = features.sum(dim=(2, 3)).unsqueeze(1)  # (B, 1, K)
        g2 = g * g
        a = g2 / (2 * g2 + sums * g2 * g + self.eps)
        a = torch.where(g != 0, a, torch.zeros_like(a))
        return h * w * torch.relu(g) * a


class LayerCAM(AnalyticCAM):
    """LayerCAM (Jiang et al., TIP 2021) at the last layer: sum_k relu(dy_c/dA_k(ij)) A_k(ij).
    With the constant gradient W_ck / (h w) it keeps only the positively weighted channels,
    each by its weight. A better seed map than XGrad-CAM on GlaS's train masks
    (docs/weak-masks.md)."""

    name = "layercam"

    def channel_weights(self, features: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
        h, w = features.shape[-2:]
        return torch.relu(super().channel_weights(features, head_weight)) / (h * w)


class LibraryCAM:
    """Any pytorch-grad-cam method by name; one forward + backward per class (slow path)."""

    needs_backward = True

    def __init__(self, name: str) -> None:
        self.name = name
        self.cls = _library_methods()[name]

    def __call__(self, member: Member, images: torch.Tensor) -> torch.Tensor:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        num_classes = member.head.out_features
        out = []
        with self.cls(model=member, target_layers=[member.target_layer]) as cam:
            for c in range(num_classes):
                targets = [ClassifierOutputTarget(c)] * images.shape[0]
                out.append(torch.from_numpy(cam(input_tensor=images, targets=targets)))
        member.eval()
        return torch.stack(out, dim=1)  # (B, C, H, W), already normalised per map


def _library_methods() -> dict[str, type]:
    import pytorch_grad_cam as g

    return {
        "lib-gradcam++": g.GradCAMPlusPlus,
        "lib-layercam": g.LayerCAM,
        "eigencam": g.EigenCAM,
        "scorecam": g.ScoreCAM,
        "lib-xgradcam": g.XGradCAM,
        "lib-gradcam": g.GradCAM,
    }


ANALYTIC: dict[str, type[AnalyticCAM]] = {
    c.name: c for c in (AnalyticCAM, GradCAM, XGradCAM, GradCAMPlusPlus, LayerCAM)
}


def cam_method(name: str) -> AnalyticCAM | LibraryCAM:
    key = name.lower()
    if key in ANALYTIC:
        return ANALYTIC[key]()
    if key in _library_methods():
        return LibraryCAM(key)
    known = sorted([*ANALYTIC, *_library_methods()])
    raise UnknownCAMError(f"unknown CAM method {name!r}; known: {', '.join(known)}")


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max each map over its last two dims to [0, 1]; a constant map becomes zeros."""
    flat = maps.flatten(-2)
    lo = flat.min(dim=-1, keepdim=True).values
    hi = flat.max(dim=-1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(1e-12), torch.zeros_like(flat))
    return out.view_as(maps)


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (..., h, w) maps to (..., H, W) (same as cv2.INTER_LINEAR upsampling)."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    out = torch.nn.functional.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *size)
