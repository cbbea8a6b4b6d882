from urllib.error import URLError

import pytest
import torch

from wsl_models.members import (
    MEMBERS,
    UnknownMemberError,
    WeightsError,
    build_member,
)


@pytest.mark.parametrize("name", sorted(MEMBERS))
def test_every_member_is_gap_dropout_linear(name):
    member = build_member(name, 2, "none", dropout=0.25)
    x = torch.rand(1, 3, 96, 64)
    with torch.no_grad():
        a = member.feature_map(x)
        logits = member(x)
    assert logits.shape == (1, 2)
    assert a.shape[1] == member.head.in_features
    assert member.dropout.p == 0.25
    assert member.target_layer is member.features


def test_lite_imagenet_weights_load_offline():
    pretrained = build_member("efficientnet_lite0", 2, "imagenet")
    scratch = build_member("efficientnet_lite0", 2, "none")
    p = dict(pretrained.features.named_parameters())
    s = dict(scratch.features.named_parameters())
    key = next(iter(p))
    assert not torch.equal(p[key], s[key])


def test_unknown_member_names_alternatives():
    with pytest.raises(UnknownMemberError, match="resnet50"):
        build_member("vgg99", 2)


def test_missing_and_corrupt_weights_files(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        build_member("tiny", 2, tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="could not be read"):
        build_member("tiny", 2, bad)


def test_local_weights_file_round_trip(tmp_path):
    a = build_member("tiny", 2, "none")
    torch.nn.init.normal_(a.features[0].weight)
    path = tmp_path / "tiny.pth"
    torch.save(a.state_dict(), path)
    b = build_member("tiny", 2, path)
    assert torch.equal(a.features[0].weight, b.features[0].weight)


def test_torchvision_state_dict_file(tmp_path):
    import torchvision

    tv = torchvision.models.densenet121(weights=None)
    torch.nn.init.normal_(tv.features.conv0.weight)
    path = tmp_path / "densenet121.pth"
    torch.save(tv.state_dict(), path)
    member = build_member("densenet121", 3, path)
    assert torch.equal(member.features[0].conv0.weight, tv.features.conv0.weight)


def test_offline_imagenet_error_names_alternatives(monkeypatch):
    import torchvision.models._api as api

    def offline(self, *a, **k):
        raise URLError("no network")

    monkeypatch.setattr(api.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(WeightsError, match="efficientnet_lite0/1/2"):
        build_member("resnet50", 2, "imagenet")


def test_bad_arguments():
    with pytest.raises(ValueError):
        build_member("tiny", 0)
    with pytest.raises(ValueError):
        build_member("tiny", 2, dropout=1.0)
