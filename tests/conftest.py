import pytest
import torch

from wsl_models.synthetic import make_dataset


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("synth"), {"train": 24, "test": 8}, (96, 96), 0)
