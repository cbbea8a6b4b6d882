import dataclasses

import pytest
from PIL import Image

from wsl_models.data import (
    DatasetError,
    ImageDataset,
    _unit_hash,
    load_dataset,
    stratified_holdout,
)
from wsl_models.images import ImageError, open_image, parse_size


def _write(tmp_path, rows, header="image,label,split"):
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "labels.csv").write_text(header + "\n" + "\n".join(rows) + ("\n" if rows else ""))
    return tmp_path


def test_loads_the_glas_layout(synth_dir):
    ds = load_dataset(synth_dir)
    assert ds.classes == ("lesion", "normal")
    assert len(ds.split("test")) == 16
    assert all(s.mask is not None for s in ds.samples)
    train, held = stratified_holdout(ds.split("train"), 0.25, seed=0)
    assert 6 <= len(held) <= 18 and {s.label for s in held} == {"lesion", "normal"}
    assert not set(train) & set(held) and len(train) + len(held) == 48


def test_holdout_is_stable_as_a_project_grows(synth_dir):
    """An image held out once stays held out: an older model never trained on its judges."""
    samples = load_dataset(synth_dir).split("train")
    _, small = stratified_holdout(samples[:20], 0.2, seed=0)
    _, big = stratified_holdout(samples, 0.2, seed=0)
    # Only an image forced out because its class had no other (hash >= fraction) may return.
    natural = [s for s in small if _unit_hash(s.name, 0) < 0.2]
    assert natural and set(natural) <= set(big)
    # Unlabelled images (label "") always train.
    unlabelled = [dataclasses.replace(s, label="") for s in samples[:6]]
    train, held = stratified_holdout(unlabelled + samples[6:], 0.2, seed=0)
    assert set(unlabelled) <= set(train) and not set(unlabelled) & set(held)


def test_missing_columns(tmp_path):
    _write(tmp_path, ["a.png,x"], header="image,label")
    with pytest.raises(DatasetError, match="missing column.*split"):
        load_dataset(tmp_path)


def test_missing_labels_file_and_empty_dataset(tmp_path):
    with pytest.raises(DatasetError, match="labels.csv"):
        load_dataset(tmp_path)
    _write(tmp_path, [])
    with pytest.raises(DatasetError, match="no images"):
        load_dataset(tmp_path)


def test_missing_image_and_unknown_split(tmp_path, synth_dir):
    _write(tmp_path, ["ghost.png,a,train"])
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path)
    with pytest.raises(DatasetError, match="splits present"):
        load_dataset(synth_dir).split("validation")


def test_unknown_class_is_refused(synth_dir):
    ds = load_dataset(synth_dir)
    with pytest.raises(DatasetError, match="unknown class"):
        ImageDataset(ds.samples, ["lesion"], (64, 64))


def test_corrupt_truncated_and_huge_images(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageError, match="not an image"):
        open_image(junk)
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), "red").save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        open_image(cut)
    # The header says 30000x30000: refused before any pixel is decoded.
    huge = tmp_path / "huge.png"
    Image.new("1", (30000, 30000)).save(huge)
    with pytest.raises(ImageError, match="above the limit|decompression bomb"):
        open_image(huge)
    with pytest.raises(ImageError, match="cannot read"):
        open_image(tmp_path / "absent.png")


def test_parse_size():
    assert parse_size("224") == (224, 224)
    assert parse_size("448x320") == (320, 448)
    with pytest.raises(ValueError):
        parse_size("10x10")
