"""What one forward per image (BATCH_INVARIANT=1, the serving default) costs against one
forward per batch, and how far apart the two answers are.

    python bench/batch_invariance.py --out bench/results/batch_invariance.json

Ensemble.predict (T = 30, random weights: speed does not depend on them) on the same 8 images
at 224 px, as one batch and as 8 batches of one, alternately (drift hits both), median of
--repeats. The difference column is the largest |p_batch - p_alone| of the ensemble's class
probabilities: not zero, which is why the default runs each image alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402
from speed import make_ensemble  # noqa: E402

from wsl_models.members import LITE_TRIO, PAPER_TRIO  # noqa: E402


def measure(members: list[str], batch: int, repeats: int) -> dict:
    ens = make_ensemble(members, (224, 224), 30)
    x = torch.rand(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    ens.predict(x, seed=0)  # warm-up of both shapes
    ens.predict(x[:1], seed=0)
    together, alone = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        joint = ens.predict(x, seed=0)
        together.append(time.perf_counter() - t)
        t = time.perf_counter()
        single = [ens.predict(x[i : i + 1], seed=0) for i in range(batch)]
        alone.append(time.perf_counter() - t)
    diff = max((joint.probs[i] - s.probs[0]).abs().max().item() for i, s in enumerate(single))
    t_joint, t_alone = statistics.median(together), statistics.median(alone)
    return {
        "members": members,
        "images": batch,
        "one_forward_per_batch_ms_per_image": 1000 * t_joint / batch,
        "one_forward_per_image_ms_per_image": 1000 * t_alone / batch,
        "per_image_over_per_batch": t_alone / t_joint,
        "max_abs_prob_difference": diff,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="bench/results/batch_invariance.json")
    args = p.parse_args()
    rows = [measure(list(m), args.images, args.repeats) for m in (LITE_TRIO, PAPER_TRIO)]
    for r in rows:
        print(f"{'+'.join(r['members'])}: per batch "
              f"{r['one_forward_per_batch_ms_per_image']:.0f} ms/image, per image "
              f"{r['one_forward_per_image_ms_per_image']:.0f} ms/image "
              f"(x{r['per_image_over_per_batch']:.2f}), max |dp| "
              f"{r['max_abs_prob_difference']:.1e}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
