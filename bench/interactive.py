"""Interactive answers: how long a smart rectangle or keypoint takes on a 1024x1024 image.

    python bench/interactive.py --out bench/results/interactive.json

The Lite trio with decoders at 224 px (random weights: speed does not depend on them),
`CamLabelModel.predict` in-process with its inference thread, as a /predict request runs it
(the HTTP layer added -0.05 % in bench/http_predict.py). The task is a 1024x1024 PNG sent as a
data: URI (decoded per request, as a download would be). Measured per request, alternating
the kinds so drift hits all: a rectangle of about 300x300 px around a disk, one positive
keypoint on it, one negative keypoint on a draft that covers the whole image, both by the
feature probe (KEYPOINTS=probe) and by GrabCut (KEYPOINTS=grabcut; the negative one a
component larger than the click's window: the GrabCut path of refine.remove_at), a positive
keypoint on a task whose pre-annotation is its prediction (the usual case in Label Studio), and
the plain pre-annotation (MC Dropout, uncertainty, ranking fields) for reference. Target:
rectangle p50 <= 1 s on this 2-core machine. ``--tta four``: the ensemble averages its maps over
four flips (``camlabel train --tta``), which costs every forward of the ensemble 4x.

    python bench/interactive.py --tta four --out bench/results/interactive_tta_four.json
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402
from speed import make_ensemble  # noqa: E402

from backend.fetch import ImageFetcher  # noqa: E402
from backend.holder import ModelHolder  # noqa: E402
from backend.inference import InferenceEngine  # noqa: E402
from backend.model import CamLabelModel  # noqa: E402
from backend.rle import mask_to_rle  # noqa: E402
from backend.settings import Settings  # noqa: E402
from wsl_models.ensemble import TTA_VIEWS  # noqa: E402
from wsl_models.members import LITE_TRIO  # noqa: E402
from wsl_models.synthetic import disk_image  # noqa: E402
from wsl_models.versions import ModelStore  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = (ROOT / "label_config" / "interactive.xml").read_text()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--tta", default="none", choices=list(TTA_VIEWS))
    p.add_argument("--out", default="bench/results/interactive.json")
    args = p.parse_args()
    model_dir = tempfile.mkdtemp()
    ens = make_ensemble(list(LITE_TRIO), (224, 224), 30, ["finding", "normal"], decoder=True)
    ens.config.set_tta(args.tta)
    ModelStore(model_dir).save(ens, {})
    settings = Settings(model_dir=model_dir)
    holder = ModelHolder(settings)
    holder.preload()
    engine = InferenceEngine()
    model = CamLabelModel(holder.get(), engine, ImageFetcher(settings), settings, CONFIG)
    grabcut = dataclasses.replace(settings, keypoints="grabcut")
    model_g = CamLabelModel(holder.get(), engine, ImageFetcher(grabcut), grabcut, CONFIG)
    img, disk = disk_image(np.random.default_rng(0), (args.side, args.side), 1)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    task = {"id": 1, "data": {"image": "data:image/png;base64,"
                              + base64.b64encode(buf.getvalue()).decode()}}  # fmt: skip
    ys, xs = np.nonzero(disk)
    cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
    half = 150
    pct = 100 / args.side
    rect = {"type": "rectanglelabels", "value": {
        "x": (cx - half) * pct, "y": (cy - half) * pct, "width": 2 * half * pct,
        "height": 2 * half * pct, "rectanglelabels": ["finding"]}}  # fmt: skip
    point = {"type": "keypointlabels", "is_positive": True,
             "value": {"x": cx * pct, "y": cy * pct, "keypointlabels": ["finding"]}}  # fmt: skip
    negative = dict(point, is_positive=False)
    full = {"type": "brushlabels", "from_name": "mask", "to_name": "image",
            "value": {"format": "rle", "brushlabels": ["finding"],
                      "rle": mask_to_rle(np.ones((args.side, args.side), bool))}}  # fmt: skip
    drafted = dict(task, drafts=[{"result": [full]}])
    # A pre-annotation of the disk (its own mask), stored with the task as Label Studio does.
    pre = dict(full, value=dict(full["value"], rle=mask_to_rle(disk)))
    predicted = dict(task, predictions=[{"result": [pre]}])
    kinds = {  # name: (model, task, context)
        "rectangle": (model, task, {"result": [rect]}),
        "keypoint": (model, task, {"result": [point]}),
        "negative keypoint": (model, drafted, {"result": [negative]}),
        "keypoint on the pre-annotation": (model, predicted, {"result": [point]}),
        "keypoint (grabcut)": (model_g, task, {"result": [point]}),
        "negative keypoint (grabcut)": (model_g, drafted, {"result": [negative]}),
        "pre-annotation": (model, task, None),
    }
    for answer, job, context in kinds.values():  # warm-up
        answer.predict([job], context)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.repeats):
        for name, (answer, job, context) in kinds.items():
            t = time.perf_counter()
            out = answer.predict([job], context)
            times[name].append(time.perf_counter() - t)
            assert "error" not in out[0], out[0]
    rows = {
        name: {
            "p50_ms": 1000 * statistics.median(ts),
            "p90_ms": 1000 * float(np.quantile(ts, 0.9)),
            "max_ms": 1000 * max(ts),
        }
        for name, ts in times.items()
    }
    for name, r in rows.items():
        print(f"{name:28s} p50 {r['p50_ms']:6.0f} ms  p90 {r['p90_ms']:6.0f} ms  "
              f"max {r['max_ms']:6.0f} ms")  # fmt: skip
    result = {"machine": machine(), "side": args.side, "repeats": args.repeats, "tta": args.tta,
              "rows": rows}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
