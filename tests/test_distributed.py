"""torchrun on CPU (gloo): two processes train what one process trains with the same global batch."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, WeightedRandomSampler

from backend.cli import main
from wsl_models import distributed
from wsl_models.data import ImageDataset, class_balanced_weights, load_dataset
from wsl_models.members import build_member
from wsl_models.synthetic import make_dataset
from wsl_models.training import seed_everything
from wsl_models.versions import ModelStore

# Dropout 0 and no augmentation: the model draws no random numbers, so the only randomness is
# the class-balanced draw of the batches, which every rank must make identically.
TRAIN = [
    "--members", "tiny,tiny", "--weights", "none", "--image-size", "64", "--epochs", "4",
    "--batch-size", "4", "--lr", "1e-2", "--dropout", "0", "--no-augment", "--device", "cpu",
    "--mc-samples", "4", "--patience", "10", "--train-masks", "--mask-classes", "lesion",
    # The segmentation stage (rank 0 only, after the classifiers) trains the decoder alone:
    # fine-tuning the top stage too would amplify the ranks' float-order differences in the
    # weights compared below (at 0.3 of the decoder's rate: 2.7e-4 of what training moved).
    "--seg-encoder-lr-factor", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("ddp"), {"train": 8, "test": 2}, (64, 64), 1)
    # Two unlabelled training images (pixel loss only): ranks then hold different numbers of
    # labelled images, which the loss normalisation must account for.
    table = root / "labels.csv"
    rows = list(csv.DictReader(table.open()))
    for row in rows:
        if row["image"] in ("train_lesion_0.png", "train_normal_1.png"):
            row["label"] = ""
    with table.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "backend.cli", "train", *args,
    ]  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=240)


def _state(store: ModelStore, vid: str, name: str) -> dict[str, torch.Tensor]:
    return torch.load(store.versions_dir / vid / name, map_location="cpu", weights_only=True)


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)
def test_two_processes_train_what_one_process_trains(data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", "--data", str(data), "--out", str(one), *TRAIN]) == 0
    run = _torchrun(["--data", str(data), "--out", str(two), *TRAIN])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    s1, s2 = ModelStore(one), ModelStore(two)
    assert len(s2.version_ids()) == 1  # rank 1 saved nothing
    v1, v2 = s1.current_id(), s2.current_id()
    m1, m2 = s1.manifest(v1), s2.manifest(v2)
    assert m2["metrics"]["world_size"] == 2 and m1["metrics"]["world_size"] == 1
    assert set(m1["files"]) == set(m2["files"]) == {"0-tiny.pt", "1-tiny.pt"}
    for k, name in enumerate(["0-tiny.pt", "1-tiny.pt"]):
        a, b = _state(s1, v1, name), _state(s2, v2, name)
        assert a.keys() == b.keys()
        seed_everything(k)  # what train_ensemble does before building member k
        init = build_member("tiny", 2, "none", 0.0, decoder=True).state_dict()
        # The decoders train on rank 0 only, after the classifiers: they are in both versions,
        # and the sharding under test is the classifiers'.
        assert any(n.startswith("decoder.") for n in a) and any(n.startswith("decoder.") for n in b)
        floats = [n for n in a if a[n].is_floating_point() and not n.startswith("decoder.")]
        moved = max(float((a[n] - init[n]).abs().max()) for n in floats)
        diff = max(float((a[n] - b[n]).abs().max()) for n in floats)
        # Measured: diff / moved ~2e-6 (float reduction order); 0.08 to 1.2 when rank 1 draws
        # other batches, labelled counts are not normalised, or BatchNorm is per rank.
        print(f"{name}: max |diff| {diff:.3g}, moved {moved:.3g}, ratio {diff / moved:.3g}")
        assert moved > 0.5, f"{name}: training barely moved the weights ({moved:.3g})"
        assert diff <= 1e-4 * moved, f"{name}: max |diff| {diff:.3g}, training moved {moved:.3g}"
        for k in a:  # num_batches_tracked: the same number of steps
            if not a[k].is_floating_point():
                assert torch.equal(a[k], b[k]), k

    for key in m1["metrics"]["members"]:
        h1 = m1["metrics"]["members"][key]["history"]
        h2 = m2["metrics"]["members"][key]["history"]
        assert len(h1) == len(h2) == 4
        for r1, r2 in zip(h1, h2, strict=True):
            assert r1.keys() == r2.keys()
            for k in r1:
                assert r2[k] == pytest.approx(r1[k], rel=1e-4, abs=1e-6), (key, r1, r2)

    e1, e2 = s1.load(), s2.load()
    ds = ImageDataset(load_dataset(data).samples, e1.config.classes, (64, 64))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    p1, p2 = e1.predict(x, seed=0), e2.predict(x, seed=0)
    assert torch.equal(p1.label, p2.label)
    assert set(p1.label.tolist()) == {0, 1}  # a trained model, not a constant answer
    assert torch.allclose(p1.probs, p2.probs, atol=1e-4)


def test_shards_partition_each_global_batch():
    batch = list(range(10, 22))
    for world in (1, 2, 3, 4):
        parts = [distributed.shard(batch, r, world) for r in range(world)]
        assert sum(parts, []) == batch
        assert {len(p) for p in parts} == {len(batch) // world}
    assert sum((distributed.shard([1, 2, 3], r, 2) for r in range(2)), []) == [1, 2, 3]
    batches = BatchSampler(range(8), 4, drop_last=True)
    assert list(distributed.RankBatchSampler(batches, 1, 2)) == [[2, 3], [6, 7]]
    with pytest.raises(ValueError, match="divisible"):
        distributed.check_batch_size(6, 4)
    distributed.check_batch_size(8, 4)


def test_single_process_loader_is_the_plain_one(data):
    """Outside torchrun the loader draws exactly what the previous DataLoader drew."""
    ds = ImageDataset(load_dataset(data).split("train"), ["lesion", "normal"], (16, 16))
    weights = class_balanced_weights(ds.labels)
    assert not distributed.is_distributed() and distributed.world_size() == 1
    torch.manual_seed(3)
    loader = distributed.global_batch_loader(ds, weights, 4, drop_last=True)
    ours = [b[0] for epoch in range(2) for b in loader]
    torch.manual_seed(3)
    sampler = WeightedRandomSampler(weights, num_samples=len(ds), replacement=True)
    loader = DataLoader(ds, batch_size=4, sampler=sampler, drop_last=True)
    plain = [b[0] for epoch in range(2) for b in loader]
    assert len(ours) == len(plain) == 2 * (len(ds) // 4)
    assert all(torch.equal(a, b) for a, b in zip(ours, plain, strict=True))
