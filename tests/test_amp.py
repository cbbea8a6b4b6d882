"""Mixed precision: which autocast each device gets, and that nothing changes on CPU.

No GPU here: the CUDA choices are checked through ``amp_settings`` (the bfloat16 capability
check injected), never by running autocast on CUDA.
"""

import contextlib

import pytest
import torch

from wsl_models import distributed
from wsl_models.cam import XGradCAM
from wsl_models.data import load_dataset
from wsl_models.ensemble import Ensemble, EnsembleConfig
from wsl_models.members import build_member
from wsl_models.supervision import HUMAN, NO_TARGET, PixelDataset, human_target
from wsl_models.training import TrainConfig, _step_loss, train_member

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_amp_settings_per_device_and_mode():
    assert distributed.amp_settings("auto", CPU) == (False, torch.float32)
    assert distributed.amp_settings("off", CPU) == (False, torch.float32)
    assert distributed.amp_settings("auto", CUDA, bf16=True) == (True, torch.bfloat16)
    assert distributed.amp_settings("auto", "cuda:1", bf16=False) == (True, torch.float16)
    assert distributed.amp_settings("on", CUDA, bf16=True) == (True, torch.bfloat16)
    assert distributed.amp_settings("off", CUDA, bf16=True) == (False, torch.float32)
    assert distributed.amp_settings(None, CPU) == (False, torch.float32)  # None: auto
    assert distributed.amp_settings(False, CUDA, bf16=True) == (False, torch.float32)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        distributed.amp_settings("on", CPU)
    with pytest.raises(ValueError, match="auto, on, off"):
        distributed.amp_settings("fp8", CUDA)


def test_autocast_helpers():
    assert isinstance(distributed.autocast(CPU, False, torch.float32), contextlib.nullcontext)
    assert isinstance(distributed.full_precision(CPU), contextlib.nullcontext)
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.rand(1, 3, 8, 8)
    # The helper enters autocast with the dtype it is given (CPU autocast stands in for CUDA),
    # and full_precision suspends it for the losses that need float32.
    with distributed.autocast(CPU, True, torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16
        with distributed.full_precision(CPU):
            assert conv(x).dtype == torch.float32
        assert conv(x).dtype == torch.bfloat16
    assert conv(x).dtype == torch.float32


def _pixel_set(synth_dir, n=8):
    ds = load_dataset(synth_dir)
    samples = ds.split("train")[: n // 2] + ds.split("train")[-n // 2 :]
    targets = [human_target(s, (64, 64)) if s.label == "lesion" else None for s in samples]
    kinds = [HUMAN if t is not None else NO_TARGET for t in targets]
    return PixelDataset(samples, ds.classes, (64, 64), targets, kinds)


def test_cpu_training_and_prediction_are_unchanged_by_amp_auto(synth_dir):
    train_ds = _pixel_set(synth_dir)
    states = []
    for amp in ("auto", "off"):
        torch.manual_seed(0)
        member = build_member("tiny", 2, "none", dropout=0.5)
        cfg = TrainConfig(epochs=2, batch_size=4, lr=3e-3, progress=False, amp=amp, device="cpu")
        train_member(member, train_ds, None, cfg, pretrained=False)
        states.append(member.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k

    config = EnsembleConfig(
        ["lesion", "normal"], ["tiny"], (64, 64), mc_samples=4, decoder=False, map_source="cam"
    )
    ensemble = Ensemble([member], config)
    x = torch.stack([train_ds[i][0] for i in range(4)])
    auto, off = ensemble.predict(x, seed=0), ensemble.predict(x, seed=0, amp="off")
    assert torch.equal(auto.mc_probs, off.mc_probs)
    assert all(torch.equal(a, b) for a, b in zip(auto.cams, off.cams, strict=True))
    assert auto.mc_probs.dtype == torch.float32
    with pytest.raises(ValueError, match="needs a CUDA device"):
        ensemble.predict(x, amp="on")


def test_loss_under_autocast_keeps_pixel_losses_in_float32(synth_dir):
    """The training step under autocast (CPU bfloat16 standing in for CUDA): the pixel and
    min-max terms run, and the loss comes out float32 and close to the float32 one."""
    train_ds = _pixel_set(synth_dir)
    torch.manual_seed(0)
    member = build_member("tiny", 2, "none", dropout=0.0, localizer=True)
    x = torch.stack([train_ds[i][0] for i in range(len(train_ds))])
    y = torch.tensor(train_ds.labels)
    target = torch.stack([train_ds[i][2] for i in range(len(train_ds))])
    kind = torch.tensor(train_ds.kinds)
    cfg = TrainConfig(minmax=True)
    args = (y, target, kind, cfg, XGradCAM(), torch.ones(2, dtype=torch.bool))

    def step():  # the trainer's step: features, then the loss from them (x for min-max)
        return _step_loss(member, member.feature_map(x), *args, x=x)

    full, _ = step()
    with distributed.autocast(CPU, True, torch.bfloat16):
        half, logits = step()
    assert logits.dtype == torch.bfloat16
    assert half.dtype == torch.float32
    assert float(half.detach()) == pytest.approx(float(full.detach()), rel=0.05)
