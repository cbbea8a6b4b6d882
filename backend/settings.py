"""Configuration from environment variables, the label-studio-ml convention, with defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# The header Label Studio's webhook carries the shared secret in (WEBHOOK_SECRET).
WEBHOOK_SECRET_HEADER = "X-Camlabel-Webhook-Secret"


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


@dataclass(frozen=True)
class Settings:
    # MODEL_DIR: one model line per project in projects/<id>/ (versions + CURRENT), the
    # training queue and job state; shared by all workers.
    model_dir: str = "models"
    # BASE_MODEL: a model directory (`camlabel train --out`) that serves every project until
    # the project's own first version, and that the first version fine-tunes from. Empty:
    # MODEL_DIR itself (a MODEL_DIR from before per-project lines keeps serving that way).
    base_model: str = ""
    label_studio_url: str = ""  # LABEL_STUDIO_URL: base for relative image URLs and the API
    label_studio_api_key: str = field(default="", repr=False)  # LABEL_STUDIO_API_KEY: PAT or legacy
    basic_auth_user: str = ""  # BASIC_AUTH_USER / BASIC_AUTH_PASS: protect every route
    basic_auth_pass: str = field(default="", repr=False)
    device: str = "auto"  # DEVICE: auto | cpu | cuda
    amp: str = "auto"  # AMP: auto (bfloat16/float16 autocast of the backbones on CUDA) | on | off
    # PREDICT_BATCH: at most this many images per forward pass (bounds memory); the worker's
    # inference thread fills a batch with whatever requests are waiting.
    predict_batch: int = 8
    # BATCH_INVARIANT=0: forward a batch at once (faster on a GPU; a task's score may then
    # differ in the 7th digit with its neighbours). Default 1: one forward per image.
    batch_invariant: bool = True
    fetch_timeout: float = 15.0  # FETCH_TIMEOUT: seconds a download may stall (per read)
    # FETCH_DEADLINE: seconds from a /predict's arrival by which its images must be in (fetched
    # FETCH_THREADS at a time); the rest get a per-task error, and the answer, inference
    # included, stays inside Label Studio's 100 s predict timeout.
    fetch_deadline: float = 60.0
    fetch_threads: int = 8
    max_download_mb: int = 64  # MAX_DOWNLOAD_MB: larger responses are refused
    max_image_pixels: int = 100_000_000  # MAX_IMAGE_PIXELS: larger images are refused
    # ALLOWED_IMAGE_HOSTS: hosts images may come from besides LABEL_STUDIO_URL's, comma-
    # separated: "img.example.org", "*.s3.amazonaws.com", "10.0.0.5:8000", "10.1.0.0/16";
    # "*" = any host with only public addresses (backend/url_policy.py).
    allowed_image_hosts: str = ""
    # WEBHOOK_SECRET: when set, /webhook needs it in the X-Camlabel-Webhook-Secret header (or
    # valid basic auth, which Label Studio's "Start Training" button sends).
    webhook_secret: str = field(default="", repr=False)
    max_request_mb: int = 50  # MAX_REQUEST_MB: larger request bodies get 413
    label_map: str = ""  # LABEL_MAP: "model_class=Label,..." when names differ
    # ACQUISITION: entropy | bald | margin | random. Each prediction's score is
    # 1 - acquisition value, so Label Studio's lowest-score-first order is this order.
    acquisition: str = "entropy"
    # RANK_DIVERSITY: size of the first query batch made diverse after each ranking (0: off).
    rank_diversity: int = 0
    # MAP_SOURCE: cam | localizer | decoder: where pre-annotation masks come from. Empty: each
    # version's own (decoder for versions trained with one, else cam). A source a version
    # lacks is ignored for that version (logged).
    map_source: str = ""
    # REVIEW_LABEL: a BrushLabels label of the project (e.g. "Uncertain"); when set, each
    # pre-annotation gets a second brush region with it where the mask is unsure: the agreeing
    # members disagree, or the consensus map is inside REVIEW_BAND ("low,high"). Off: "".
    review_label: str = ""
    # BOX_PRIOR: what seeds a smart rectangle's GrabCut inside the box: "box" (the box alone:
    # every pixel "probably foreground") or "map" (the model's map marks its confidently low
    # part "probably background"). Default "box": on GlaS's training split the map made the
    # answer worse (mean gland IoU 0.40 vs 0.56; bench/interactive_quality.py).
    box_prior: str = "box"
    # KEYPOINTS: how smart keypoints re-segment: "probe" (a logistic regression on the first
    # member's features, fitted on the mask shown and the clicks: wsl_models/probe.py) or
    # "grabcut" (GrabCut in a window around each click: wsl_models/refine.py). Default "probe":
    # 10 clicks took the mean IoU of 40 GlaS train images to 0.77 (GrabCut: 0.53 on 20 of them).
    keypoints: str = "probe"
    review_band: str = "0.3,0.7"
    # EXPLAIN_LEVELS: the map levels each explanation layer is drawn at (label_config/README.md);
    # each level adds a region per layer (on GlaS about 35 KB of RLE each: docs/speed.md).
    explain_levels: str = "0.5"
    # EXPLAIN_STYLE: "outline" (each level's contour: members stay apart where they overlap) or
    # "fill" (nested translucent regions, a heat map; Label Studio draws them nearly opaque).
    explain_style: str = "outline"
    # MAX_LOADED_LINES: project lines a worker keeps loaded (the base model's is always kept);
    # past it, the line least recently asked for is dropped from memory, and its next request
    # waits while it loads back. 0: no limit.
    max_loaded_lines: int = 8

    @property
    def review_band_values(self) -> tuple[float, float]:
        try:
            low, high = (float(v) for v in self.review_band.split(","))
        except ValueError as exc:
            raise ValueError(f"REVIEW_BAND must be 'low,high', got {self.review_band!r}") from exc
        if not 0 <= low < high <= 1:
            raise ValueError(f"REVIEW_BAND needs 0 <= low < high <= 1, got {self.review_band!r}")
        return low, high

    @property
    def explain_level_values(self) -> tuple[float, ...]:
        try:
            levels = tuple(float(v) for v in self.explain_levels.split(","))
        except ValueError as exc:
            raise ValueError(
                f"EXPLAIN_LEVELS must be levels in (0, 1] separated by commas, "
                f"got {self.explain_levels!r}"
            ) from exc
        if not all(0 < v <= 1 for v in levels):
            raise ValueError(f"EXPLAIN_LEVELS must lie in (0, 1], got {self.explain_levels!r}")
        return levels

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            model_dir=_env("MODEL_DIR", cls.model_dir),
            base_model=_env("BASE_MODEL"),
            label_studio_url=_env("LABEL_STUDIO_URL").rstrip("/"),
            label_studio_api_key=_env("LABEL_STUDIO_API_KEY"),
            basic_auth_user=_env("BASIC_AUTH_USER"),
            basic_auth_pass=_env("BASIC_AUTH_PASS"),
            device=_env("DEVICE", cls.device),
            amp=_env("AMP", cls.amp),
            predict_batch=int(_env("PREDICT_BATCH", str(cls.predict_batch))),
            batch_invariant=_env("BATCH_INVARIANT", "1").lower() not in ("0", "false", "no", "off"),
            fetch_timeout=float(_env("FETCH_TIMEOUT", str(cls.fetch_timeout))),
            fetch_deadline=float(_env("FETCH_DEADLINE", str(cls.fetch_deadline))),
            fetch_threads=int(_env("FETCH_THREADS", str(cls.fetch_threads))),
            max_download_mb=int(_env("MAX_DOWNLOAD_MB", str(cls.max_download_mb))),
            max_image_pixels=int(_env("MAX_IMAGE_PIXELS", str(cls.max_image_pixels))),
            allowed_image_hosts=_env("ALLOWED_IMAGE_HOSTS"),
            webhook_secret=_env("WEBHOOK_SECRET"),
            max_request_mb=int(_env("MAX_REQUEST_MB", str(cls.max_request_mb))),
            label_map=_env("LABEL_MAP"),
            acquisition=_env("ACQUISITION", cls.acquisition),
            rank_diversity=int(_env("RANK_DIVERSITY", str(cls.rank_diversity))),
            map_source=_env("MAP_SOURCE").lower(),
            review_label=_env("REVIEW_LABEL"),
            box_prior=_env("BOX_PRIOR", cls.box_prior).lower(),
            keypoints=_env("KEYPOINTS", cls.keypoints).lower(),
            review_band=_env("REVIEW_BAND", cls.review_band),
            explain_levels=_env("EXPLAIN_LEVELS", cls.explain_levels),
            explain_style=_env("EXPLAIN_STYLE", cls.explain_style).lower(),
            max_loaded_lines=int(_env("MAX_LOADED_LINES", str(cls.max_loaded_lines))),
        )
