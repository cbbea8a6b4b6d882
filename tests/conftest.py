import pytest
import torch

from wsl_models.data import load_dataset
from wsl_models.ensemble import EnsembleConfig
from wsl_models.synthetic import make_dataset
from wsl_models.training import TrainConfig, train_ensemble
from wsl_models.versions import ModelStore


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("synth"), {"train": 24, "test": 8}, (96, 96), 0)


@pytest.fixture(scope="session")
def model_dir(synth_dir, tmp_path_factory):
    """A trained two-member tiny ensemble (lesion / normal, 96 px) as a single-line MODEL_DIR."""
    ds = load_dataset(synth_dir)
    cfg = EnsembleConfig(list(ds.classes), ["tiny", "tiny"], (96, 96), mask_classes=["lesion"])
    tcfg = TrainConfig(epochs=20, lr=3e-3, weights="none", progress=False)
    ensemble, metrics = train_ensemble(ds, cfg, tcfg)
    root = tmp_path_factory.mktemp("models")
    ModelStore(root).save(ensemble, metrics)
    return root
