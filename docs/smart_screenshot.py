"""Screenshot a task after a smart rectangle, in headless Chromium, from a running demo.

    .venv/bin/camlabel demo &                       # wait for "camlabel demo is ready"
    .venv/bin/python docs/smart_screenshot.py       # -> docs/smart_rectangle.png

Switches the demo project to label_config/interactive.xml and its ML backend to interactive
mode, then asks for a smart rectangle around the demo task's pre-annotated finding through
`POST /api/ml/{id}/interactive-annotating` (the call the labeling UI makes when a smart
rectangle is drawn; the mouse drag itself is not simulated), saves the rectangle with the
brush region that came back as the task's annotation (what the annotator submits), and
screenshots the task the way docs/screenshot.py does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "docs"))
from screenshot import screenshot  # noqa: E402

from backend.local_label_studio import login_session  # noqa: E402
from backend.rle import rle_to_mask  # noqa: E402


def _api(session, base: str, method: str, path: str, **kw):
    headers = {"X-CSRFToken": session.cookies.get("csrftoken", ""), "Referer": base}
    r = session.request(method, base + path, headers=headers, timeout=120, **kw)
    if r.status_code >= 400:
        raise RuntimeError(f"{method} {path}: HTTP {r.status_code} {r.text[:300]}")
    return r.json() if r.content else None


def smart_rectangle(info: dict) -> dict:
    """The rectangle and the brush region the backend answered, saved as an annotation."""
    base, pid, tid = info["label_studio"], info["project"], info["task"]
    s = login_session(base, info["email"], info["password"])
    config = (ROOT / "label_config" / "interactive.xml").read_text()
    _api(s, base, "PATCH", f"/api/projects/{pid}", json={"label_config": config})
    (ml,) = _api(s, base, "GET", "/api/ml", params={"project": pid})
    # (Label Studio 1.23 answers 500 to a PATCH without the project and the url)
    body = {"project": pid, "url": ml["url"], "is_interactive": True}
    _api(s, base, "PATCH", f"/api/ml/{ml['id']}", json=body)
    preds = _api(s, base, "GET", "/api/predictions", params={"task": tid})
    brush = next(r for p in preds for r in p["result"] if r["type"] == "brushlabels")
    w, h = brush["original_width"], brush["original_height"]
    ys, xs = np.nonzero(rle_to_mask(brush["value"]["rle"], h, w))
    pad = 0.08 * max(w, h)
    x0, y0 = max(xs.min() - pad, 0), max(ys.min() - pad, 0)
    x1, y1 = min(xs.max() + pad, w), min(ys.max() + pad, h)
    rect = {"id": "smartbox", "from_name": "box", "to_name": "image", "type": "rectanglelabels",
            "original_width": w, "original_height": h, "image_rotation": 0, "origin": "manual",
            "value": {"x": 100 * x0 / w, "y": 100 * y0 / h, "width": 100 * (x1 - x0) / w,
                      "height": 100 * (y1 - y0) / h, "rotation": 0,
                      "rectanglelabels": ["finding"]}}  # fmt: skip
    answer = _api(s, base, "POST", f"/api/ml/{ml['id']}/interactive-annotating",
                  json={"task": tid, "context": {"result": [rect]}})  # fmt: skip
    if "data" not in answer:
        raise RuntimeError(f"interactive-annotating answered {answer}")
    result = [rect, *answer["data"]["result"]]
    _api(s, base, "POST", f"/api/tasks/{tid}/annotations", json={"result": result})
    return answer["data"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", default="runs/demo/demo.json", help="written by `camlabel demo`")
    p.add_argument("--out", default="docs/smart_rectangle.png")
    p.add_argument("--chromium", default="chromium")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=860)
    p.add_argument("--wait", type=float, default=60, help="seconds for the page to load")
    args = p.parse_args()
    info = json.loads(Path(args.demo).read_text())
    answer = smart_rectangle(info)
    print(f"smart rectangle on task {info['task']}: {len(answer['result'])} region(s), "
          f"model version {answer.get('model_version')}")  # fmt: skip
    screenshot(info, Path(args.out), args.chromium, args.width, args.height, args.wait)
    return 0


if __name__ == "__main__":
    sys.exit(main())
