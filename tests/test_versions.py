import pytest
import torch

from wsl_models.ensemble import Ensemble, EnsembleConfig
from wsl_models.members import build_member
from wsl_models.versions import ModelStore, VersionError


def _ensemble():
    torch.manual_seed(0)
    cfg = EnsembleConfig(classes=["a", "b"], members=["tiny", "tiny"], image_size=(64, 64))
    members = [build_member("tiny", 2, decoder=True) for _ in range(2)]
    return Ensemble(members, cfg)


def test_round_trip_gives_identical_predictions(tmp_path):
    ens = _ensemble()
    store = ModelStore(tmp_path)
    vid = store.save(ens, {"acc": 1.0})
    assert store.current_id() == vid and store.version_ids() == [vid]
    loaded = store.load()
    x = torch.rand(2, 3, 64, 64)
    a, b = ens.predict(x, seed=3), loaded.predict(x, seed=3)
    assert torch.allclose(a.probs, b.probs)
    assert all(torch.allclose(p, q) for p, q in zip(a.cams, b.cams, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(a.decoder_maps, b.decoder_maps, strict=True))
    assert a.decoder_maps[0].shape == (2, 1, 32, 32)  # stride 2 for the tiny member
    assert store.manifest(vid)["metrics"] == {"acc": 1.0}


def test_crash_mid_save_keeps_current_version(tmp_path, monkeypatch):
    store = ModelStore(tmp_path)
    first = store.save(_ensemble(), {})
    calls = {"n": 0}
    real_save = torch.save

    def crash_on_second(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", crash_on_second)
    with pytest.raises(OSError):
        store.save(_ensemble(), {})
    assert store.current_id() == first
    assert store.version_ids() == [first]
    assert not [p for p in (tmp_path / "versions").iterdir() if p.name.startswith(".tmp")]
    store.load()  # still loads


def test_corrupt_checkpoint_is_never_loaded(tmp_path):
    store = ModelStore(tmp_path)
    vid = store.save(_ensemble(), {})
    weights = next((tmp_path / "versions" / vid).glob("*.pt"))
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(VersionError, match="corrupt"):
        store.load()


def test_no_version_yet_and_unknown_version(tmp_path):
    store = ModelStore(tmp_path)
    with pytest.raises(VersionError, match="no current model version"):
        store.load()
    with pytest.raises(VersionError):
        store.set_current("nope")
