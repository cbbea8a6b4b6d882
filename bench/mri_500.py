"""A ~500-image project from LGG for timing: its train slices plus whole test patients.

    python bench/mri_500.py --data ../shared/data/lgg --out /tmp/lgg500

Writes OUT/labels.csv (LGG's layout) with the slices of test patients, in patient-id order,
moved to train while the train split stays at or under --train (500); the remaining test
patients stay test, so no patient is in both. OUT/images and OUT/masks are links to LGG's
folders: no image is copied.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="../shared/data/lgg")
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=500)
    args = p.parse_args()
    data, out = Path(args.data).resolve(), Path(args.out)
    rows = list(csv.DictReader((data / "labels.csv").open()))
    n_train = sum(r["split"] == "train" for r in rows)
    moved = []
    for patient in sorted({r["patient_id"] for r in rows if r["split"] == "test"}):
        count = sum(r["patient_id"] == patient for r in rows)
        if n_train + count <= args.train:
            moved.append(patient)
            n_train += count
    for r in rows:
        if r["patient_id"] in moved:
            r["split"] = "train"
    out.mkdir(parents=True, exist_ok=True)
    for folder in ("images", "masks"):
        link = out / folder
        if not link.exists():
            link.symlink_to(data / folder)
    with (out / "labels.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    n_test = sum(r["split"] == "test" for r in rows)
    print(f"{out}: {n_train} train, {n_test} test; moved to train: {', '.join(moved)}")


if __name__ == "__main__":
    main()
