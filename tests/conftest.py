import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from wsl_models.data import load_dataset
from wsl_models.ensemble import EnsembleConfig
from wsl_models.synthetic import make_dataset
from wsl_models.training import TrainConfig, train_ensemble
from wsl_models.versions import ModelStore

# Under pytest-xdist (`make test` runs two workers) each worker, and every process it starts
# (the backend, `camlabel train`, torchrun), gets one thread: two 2-thread torch processes on
# this 2-core machine slow each other several-fold.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
if THREADS == 1:
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)


def _built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder that ``build`` fills once per test run, whichever xdist worker asks first; a
    worker that asks while another builds waits for it. Each caller gets its own copy, so a
    test that writes into it cannot reach another worker's."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    built = shared / f"built-{name}"
    with FileLock(f"{built}.lock"):
        if not (built / ".complete").exists():
            shutil.rmtree(built, ignore_errors=True)
            built.mkdir()
            build(built)
            (built / ".complete").touch()
    copy = tmp_path_factory.mktemp(name)
    shutil.copytree(built, copy, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".complete"))
    return copy


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("synth"), {"train": 24, "test": 8}, (96, 96), 0)


@pytest.fixture(scope="session")
def model_dir(synth_dir, tmp_path_factory):
    """A trained two-member tiny ensemble (lesion / normal, 96 px) as a single-line MODEL_DIR,
    trained once for both workers."""

    def build(root: Path) -> None:
        ds = load_dataset(synth_dir)
        cfg = EnsembleConfig(list(ds.classes), ["tiny", "tiny"], (96, 96), mask_classes=["lesion"])
        # No self-seed rounds: the serving tests need a decoder, not the best one
        # (tests/test_seeds.py and tests/test_decoder.py cover the rounds).
        tcfg = TrainConfig(
            epochs=20,
            lr=3e-3,
            weights="none",
            progress=False,
            decoder_self_seed_rounds=0,
            decoder_probe_rounds=0,
        )
        ensemble, metrics = train_ensemble(ds, cfg, tcfg)
        ModelStore(root).save(ensemble, metrics)

    return _built_once(tmp_path_factory, "models", build)


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """A real Label Studio 1.23.2 (.lsvenv, SQLite, loopback), shared by the modules that
    drive it (each makes its own projects)."""
    from .ls_harness import LS_BIN, LabelStudio
    from .progress import wait_http

    if not LS_BIN.exists():
        pytest.fail(
            f"Label Studio not installed at {LS_BIN}: run `make test` (it installs .lsvenv)"
        )
    ls = LabelStudio(tmp_path_factory.mktemp("ls")).start(wait=wait_http)
    yield ls
    ls.stop()


@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> Path:
    """A model trained offline with `camlabel train` on finding / normal images: the base model
    that serves every project until the project's first version (and that version's start);
    trained once for both workers."""

    def build(out: Path) -> None:
        data = make_dataset(tmp_path_factory.mktemp("base_data"), {"train": 12}, (96, 96), 5)
        table = data / "labels.csv"
        table.write_text(table.read_text().replace(",lesion,", ",finding,"))
        train = subprocess.run(
            [sys.executable, "-m", "backend.cli", "train", "--data", str(data), "--out", str(out),
             "--members", "tiny,tiny", "--image-size", "96", "--weights", "none", "--epochs", "30",
             "--lr", "0.003", "--mask-classes", "finding", "--self-seed-rounds", "0",
             "--probe-rounds", "0"],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert train.returncode == 0, train.stderr[-2000:]

    return _built_once(tmp_path_factory, "base_model", build)
