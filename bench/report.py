"""Markdown tables from bench/results/localization/*.json (python bench/report.py > bench/results/localization/summary.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(folder: str = "bench/results/localization") -> None:
    rows = [
        "| run | members (weights) | input | select | acc | map | PxAP | Dice fg | Dice bg | mIoU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    variants = [
        "| run | input | CAM | PxAP intersection | PxAP mean map |",
        "|---|---|---|---|---|",
    ]
    for path in sorted(Path(folder).glob("*.json")):
        r = json.loads(path.read_text())
        size = f"{r['image_size'][1]}x{r['image_size'][0]}"
        select = "B-LOC" if path.name.startswith("bloc_") else "val loss"
        group = "Lite0/1/2 (ImageNet)" if "lite" in r["config"] else "R50/B0/D121 (scratch)"
        for src in ("intersection", "mean_map", "baseline_all_ones", "baseline_gaussian"):
            loc = r["localization"][src]
            rows.append(
                f"| {path.stem} | {group} | {size} | {select} | {r['accuracy']['ensemble']:.1f} "
                f"| {src} | {loc['pxap']:.1f} | {loc['dice_fg']:.1f} | {loc['dice_bg']:.1f} "
                f"| {loc['miou']:.1f} |"
            )
        for name, v in r.get("cam_variants", {}).items():
            variants.append(
                f"| {path.stem} | {size} | {name} | {v['intersection']['pxap']:.1f} "
                f"| {v['mean_map']['pxap']:.1f} |"
            )
    print("\n".join(rows))
    print()
    print("\n".join(variants))


if __name__ == "__main__":
    main(*sys.argv[1:])
