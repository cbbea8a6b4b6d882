"""What the explanation layers cost per task: added time and added bytes per prediction.

    python bench/explanation_cost.py --data ../shared/data/glas --model MODELS/lite_224 \\
        --out bench/results/explanation_cost.json

The backend's own /predict (Flask test client, one worker, images as data URIs so no network)
on the test images at their native size, one task per request as Label Studio sends them,
with label_config/finding_normal.xml and with label_config/explain.xml (the same config plus
the explanation control). The two configs alternate task by task, so the machine's noise hits
both alike; the added time is the median of the per-task differences, also given as a ratio
to the plain request. Bytes are the JSON of each prediction as Label Studio stores it.
Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import loadavg, machine  # noqa: E402

from backend.app import create_app  # noqa: E402
from backend.settings import Settings  # noqa: E402
from wsl_models.data import load_dataset  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "label_config"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--images", type=int, default=30)
    p.add_argument("--label", default="finding", help="the brush label the model's class maps to")
    p.add_argument(
        "--label-map", default="", help="LABEL_MAP, e.g. benign=finding,malignant=finding"
    )
    p.add_argument("--levels", default=Settings.explain_levels, help="EXPLAIN_LEVELS")
    p.add_argument("--style", default=Settings.explain_style, help="EXPLAIN_STYLE")
    p.add_argument("--out", default="bench/results/explanation_cost.json")
    args = p.parse_args()
    configs = {
        name: (CONFIGS / f"{name}.xml").read_text().replace('"finding"', json.dumps(args.label))
        for name in ("finding_normal", "explain")
    }
    settings = Settings(model_dir=args.model, label_map=args.label_map,
                        explain_levels=args.levels, explain_style=args.style)  # fmt: skip
    client = create_app(settings).test_client()
    samples = load_dataset(args.data).split(args.split)[: args.images]
    rows = []
    for i, s in enumerate(samples):
        uri = "data:image/png;base64," + base64.b64encode(Path(s.image).read_bytes()).decode()
        task = {"id": i + 1, "data": {"image": uri}}
        row = {"image": Path(s.image).name}
        order = list(configs) if i % 2 == 0 else list(reversed(configs))
        for name in order:
            body = {"tasks": [task], "label_config": configs[name], "project": "1.1"}
            start = time.perf_counter()
            r = client.post("/predict", json=body)
            row[f"{name}_s"] = time.perf_counter() - start
            (result,) = r.get_json()["results"]
            row[f"{name}_bytes"] = len(json.dumps(result["result"]))
            row[f"{name}_regions"] = len(result["result"])
        rows.append(row)
        print(row, flush=True)
    warm = rows[1:]  # the first request loads the model
    added_s = [r["explain_s"] - r["finding_normal_s"] for r in warm]
    added_b = [r["explain_bytes"] - r["finding_normal_bytes"] for r in warm]
    summary = {
        "tasks": len(warm),
        "plain_s_median": statistics.median(r["finding_normal_s"] for r in warm),
        "explain_s_median": statistics.median(r["explain_s"] for r in warm),
        "added_s_median": statistics.median(added_s),
        "added_ratio_median": statistics.median(
            r["explain_s"] / r["finding_normal_s"] for r in warm
        ),
        "plain_bytes_median": statistics.median(r["finding_normal_bytes"] for r in warm),
        "added_bytes_median": statistics.median(added_b),
        "added_bytes_max": max(added_b),
        "explanation_regions_median": statistics.median(
            r["explain_regions"] - r["finding_normal_regions"] for r in warm
        ),
    }
    out = {"machine": machine(), "loadavg": loadavg(), "model": args.model,
           "levels": args.levels, "style": args.style,
           "data": args.data, "summary": summary, "rows": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
