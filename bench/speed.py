"""Speed: the straightforward pipeline against ours, on the same images and weights.

    python bench/speed.py --out bench/results/speed.json

straightforward = per member, pytorch-grad-cam XGradCAM for the predicted class (forward +
backward) + T full-network MC-Dropout passes (only dropout in train mode).
ours            = Ensemble.predict: one forward per member, CAMs of every class in closed form,
                  T samples of the dropout + linear head over the pooled features.
floor           = one forward pass of the members on the same batch.

Each (pipeline, batch) runs in its own process so that peak RSS is its own.
Also measures ours and the floor for the EfficientNet-Lite trio at several input sizes.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from wsl_models.cam import normalize_maps, resize_maps
from wsl_models.ensemble import Ensemble, EnsembleConfig
from wsl_models.images import parse_size
from wsl_models.members import LITE_TRIO, PAPER_TRIO, build_member

CLASSES = ["benign", "malignant"]


def make_ensemble(
    members: list[str],
    size: tuple[int, int],
    samples: int,
    classes: list[str] | None = None,
    decoder: bool = False,
) -> Ensemble:
    """Random weights: speed does not depend on them."""
    classes = classes or CLASSES
    torch.manual_seed(0)
    built = [build_member(m, len(classes), "none", dropout=0.5, decoder=decoder) for m in members]
    for member in built:  # realistic activations: fresh BatchNorm statistics zero many of them
        for mod in member.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    cfg = EnsembleConfig(classes, members, size, mc_samples=samples, decoder=decoder)
    return Ensemble(built, cfg)


def straightforward(ens: Ensemble, x: torch.Tensor, samples: int, seed: int):
    from pytorch_grad_cam import XGradCAM as LibXGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cams, probs = [], []
    for k, member in enumerate(ens.members):
        with LibXGradCAM(model=member, target_layers=[member.target_layer]) as lib:
            logits = member(x).detach()
            targets = [ClassifierOutputTarget(int(c)) for c in logits.argmax(1)]
            cams.append(torch.from_numpy(lib(input_tensor=x, targets=targets)))
        for m in member.modules():
            if isinstance(m, torch.nn.Dropout):
                m.train()
        torch.manual_seed(seed + k)  # Ensemble.predict seeds member k with seed + k
        with torch.no_grad():
            probs.append(torch.stack([torch.softmax(member(x), -1) for _ in range(samples)]))
        member.eval()
    return cams, torch.stack(probs)


def ours(ens: Ensemble, x: torch.Tensor, seed: int, member_class: torch.Tensor | None = None):
    out = ens.predict(x, seed=seed)
    if member_class is None:
        member_class = out.member_probs.argmax(-1)  # (M, B)
    cams = []
    for k, maps in enumerate(out.cams):
        chosen = maps[torch.arange(x.shape[0]), member_class[k]]
        cams.append(normalize_maps(resize_maps(chosen, tuple(x.shape[-2:]))))
    return cams, out.mc_probs


def floor(ens: Ensemble, x: torch.Tensor) -> None:
    with torch.no_grad():
        for member in ens.members:
            member(x)


def floor_with_decoder(ens: Ensemble, x: torch.Tensor) -> None:
    """The floor plus what the decoder costs: the same forward with taps, then the decoder."""
    with torch.no_grad():
        for member in ens.members:
            features, taps = member.features_and_taps(x)
            member.head(features.mean(dim=(2, 3)))
            member.decode(taps)


def decoder_overhead(args: argparse.Namespace) -> dict:
    """Floor vs floor + decoder on the same members, weights and batch, timed alternately in
    one process so both see the same machine load; the ratio is what the decoder adds."""
    torch.set_num_threads(args.threads)
    size = parse_size(args.size)
    members = args.members.split(",")
    ens = make_ensemble(members, size, args.samples, decoder=True)
    x = torch.rand(args.batch, 3, *size, generator=torch.Generator().manual_seed(1))
    runs = {"floor": lambda: floor(ens, x), "floor+decoder": lambda: floor_with_decoder(ens, x)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for run in runs.values():
        run()  # warm-up
    for _ in range(args.repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for m in ens.members for p in m.decoder_parameters())
    backbone = sum(p.numel() for m in ens.members for p in m.backbone_parameters())
    return {
        "pipeline": "decoder_overhead",
        "members": members,
        "size": list(size),
        "batch": args.batch,
        "repeats": args.repeats,
        "floor_s": med["floor"],
        "floor_decoder_s": med["floor+decoder"],
        "ratio": med["floor+decoder"] / med["floor"],
        "decoder_params": params,
        "backbone_params": backbone,
    }


def worker(args: argparse.Namespace) -> dict:
    if args.pipeline == "decoder_overhead":
        return decoder_overhead(args)
    torch.set_num_threads(args.threads)
    size = parse_size(args.size)
    members = args.members.split(",")
    ens = make_ensemble(members, size, args.samples)
    x = torch.rand(args.batch, 3, *size, generator=torch.Generator().manual_seed(1))
    run = {
        "straightforward": lambda: straightforward(ens, x, args.samples, 7),
        "ours": lambda: ours(ens, x, 7),
        "floor": lambda: floor(ens, x),
    }[args.pipeline]
    run()  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    result = {
        "pipeline": args.pipeline,
        "members": members,
        "size": list(size),
        "batch": args.batch,
        "repeats": args.repeats,
        "seconds_per_batch": statistics.median(times),
        "latency_ms_per_image": 1000 * statistics.median(times) / args.batch,
        "images_per_s": args.batch / statistics.median(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if args.pipeline == "ours" and args.compare:
        cams_a, _ = straightforward(ens, x, args.samples, 7)
        # Our MC samples share one dropout mask per sample across the batch (an image's samples
        # do not depend on its batch), so the reference draws are made one image at a time.
        probs_a = torch.cat(
            [straightforward(ens, x[i : i + 1], args.samples, 7)[1] for i in range(len(x))], dim=2
        )
        with torch.no_grad():  # the classes the library explained: deterministic argmax
            classes = torch.stack([m(x).argmax(1) for m in ens.members])
        cams_b, probs_b = ours(ens, x, 7, classes)
        result["max_abs_diff_cam"] = max(
            float((a - b).abs().max()) for a, b in zip(cams_a, cams_b, strict=True)
        )
        result["max_abs_diff_mc_probs"] = float((probs_a - probs_b).abs().max())
    return result


def spawn(**kw) -> dict:
    cmd = [sys.executable, __file__, "--worker"]
    for k, v in kw.items():
        if v is True:
            cmd.append(f"--{k}")
        else:
            cmd += [f"--{k}", str(v)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    row = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pipeline", default="ours")
    p.add_argument("--members", default=",".join(PAPER_TRIO))
    p.add_argument("--size", default="224")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--compare", action="store_true")
    p.add_argument("--out", default="bench/results/speed.json")
    p.add_argument("--sizes", default="224,448x320,672x448", help="resolution study, Lite trio")
    p.add_argument(
        "--decoder-only", action="store_true", help="only the decoder rows (floor vs +decoder)"
    )
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    decoder_rows = [
        spawn(
            pipeline="decoder_overhead",
            members=",".join(group),
            size=224,
            batch=batch,
            repeats=9 if batch == 1 else 5,
            samples=args.samples,
            threads=args.threads,
        )
        for group in (LITE_TRIO, PAPER_TRIO)
        for batch in (1, 16)
    ]
    print(decoder_table(decoder_rows))
    if args.decoder_only:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": machine_info(args), "rows": decoder_rows}, indent=2))
        return
    rows = list(decoder_rows)
    trio = ",".join(PAPER_TRIO)
    for batch in (1, 16):
        reps = {"straightforward": 2 if batch == 16 else 3, "ours": 5, "floor": 5}
        for pipe in ("floor", "ours", "straightforward"):
            rows.append(
                spawn(
                    pipeline=pipe,
                    members=trio,
                    size=224,
                    batch=batch,
                    repeats=reps[pipe],
                    samples=args.samples,
                    threads=args.threads,
                    **({"compare": True} if pipe == "ours" else {}),
                )
            )
    for size in args.sizes.split(","):
        for pipe in ("floor", "ours"):
            rows.append(
                spawn(
                    pipeline=pipe,
                    members=",".join(LITE_TRIO),
                    size=size,
                    batch=16,
                    repeats=3,
                    samples=args.samples,
                    threads=args.threads,
                )
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine_info(args), "rows": rows}, indent=2))
    print(table([r for r in rows if r["pipeline"] != "decoder_overhead"]))


def machine_info(args: argparse.Namespace) -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }


def _group(row: dict) -> str:
    return "paper trio" if row["members"] == list(PAPER_TRIO) else "lite trio"


def decoder_table(rows: list[dict]) -> str:
    out = [
        "| members | size | batch | floor ms/batch | floor + decoder ms/batch | added | decoder params |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {_group(r)} | {r['size'][1]}x{r['size'][0]} | {r['batch']} | {1000 * r['floor_s']:.1f} "
            f"| {1000 * r['floor_decoder_s']:.1f} | {100 * (r['ratio'] - 1):+.1f} % "
            f"| {r['decoder_params'] / 1e3:.0f} k ({100 * r['decoder_params'] / r['backbone_params']:.1f} % of the backbones) |"
        )
    return "\n".join(out)


def table(rows: list[dict]) -> str:
    out = [
        "| members | size | batch | pipeline | ms/image | images/s | peak RSS MB | vs floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    floors = {
        (tuple(r["members"]), tuple(r["size"]), r["batch"]): r["seconds_per_batch"]
        for r in rows
        if r["pipeline"] == "floor"
    }
    for r in rows:
        f = floors.get((tuple(r["members"]), tuple(r["size"]), r["batch"]))
        ratio = f"{r['seconds_per_batch'] / f:.2f}x" if f else "-"
        out.append(
            f"| {_group(r)} | {r['size'][1]}x{r['size'][0]} | {r['batch']} | {r['pipeline']} "
            f"| {r['latency_ms_per_image']:.1f} | {r['images_per_s']:.2f} "
            f"| {r['peak_rss_mb']:.0f} | {ratio} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()
