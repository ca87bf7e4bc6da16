"""The loader's options, one dataclass for both loaders (the training recipe fills it from its TOML table)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from facetool.pipeline.errors import FacetoolError

LAST_BATCH = ("partial", "drop")
DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class LoaderConfig:
    """Options of the training loaders (DALI and the webdataset fallback give them the same meaning).

    Probabilities are per sample. An augmentation whose probability is 0 is left out of the pipeline entirely.
    ``masked_prob`` (q) is the share of *all* samples shown masked: a sample that has a rendered twin is shown
    masked with probability q / f, where f is the share of samples that have one (from the manifest), so q <= f.
    """

    batch_size: int = 128
    seed: int = 0
    image_size: int = 112  # the shards' images (InsightFace sets are 112x112); output is image_size square
    dtype: str = "float32"  # or "float16"
    last_batch: str = "partial"  # "partial": every sample once per epoch; "drop": full batches only
    shuffle_buffer: int = 16384  # samples in the reader's shuffle buffer (the shards are shuffled globally)

    masked_prob: float = 0.0  # q: share of samples shown as their masked twin (chosen before decoding)
    flip_prob: float = 0.5  # horizontal flip
    crop_prob: float = 0.0  # mild random resized crop ...
    crop_area: tuple[float, float] = (0.85, 1.0)  # ... of this share of the area (never torchvision's 0.08)
    crop_aspect: tuple[float, float] = (0.9, 1.0 / 0.9)  # ... and this aspect ratio range
    color_prob: float = 0.0  # colour jitter: brightness, contrast, saturation factors in [1 - x, 1 + x] ...
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.0  # ... and a hue shift in [-hue, hue] degrees
    gray_prob: float = 0.0  # grayscale (three equal channels)
    blur_prob: float = 0.0  # Gaussian blur with sigma in blur_sigma
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    downup_prob: float = 0.0  # down-then-up resize (low-resolution robustness) ...
    downup_scale: tuple[float, float] = (0.5, 0.8)  # ... to this fraction of image_size and back

    # DALI tuning (small faces: many tiny samples, so per-sample buffers small and batches prefetched)
    threads: int = 0  # DALI CPU threads; 0: this rank's share of the cores (LOCAL_WORLD_SIZE), one more on the CPU
    prefetch: int = 2  # batches DALI prepares ahead (pipeline prefetch_queue_depth)
    reader_prefetch: int = 1  # batches the reader reads ahead
    tensor_init_bytes: int = 32 * 1024  # first allocation per sample and output (DALI's default is 1 MiB)
    hw_decoder_load: float = 0.65  # GPU only: share of JPEGs sent to the hardware decoder (A100/H100 class)

    # webdataset fallback
    workers: int = 0  # DataLoader worker processes; 0: the cores of this machine divided by its ranks

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise FacetoolError naming the option that is out of range."""
        _int_at_least(self, "batch_size", 1)
        _int_at_least(self, "image_size", 8)
        _int_at_least(self, "shuffle_buffer", 1)
        _int_at_least(self, "threads", 0)
        _int_at_least(self, "prefetch", 1)
        _int_at_least(self, "reader_prefetch", 1)
        _int_at_least(self, "tensor_init_bytes", 1)
        _int_at_least(self, "workers", 0)
        if self.dtype not in DTYPES:
            raise FacetoolError(f"loader dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.last_batch not in LAST_BATCH:
            raise FacetoolError(f"loader last_batch must be one of {', '.join(LAST_BATCH)}, got {self.last_batch!r}")
        for name in (
            "masked_prob",
            "flip_prob",
            "crop_prob",
            "color_prob",
            "gray_prob",
            "blur_prob",
            "downup_prob",
            "hw_decoder_load",
        ):
            _unit(self, name)
        for name in ("brightness", "contrast", "saturation"):
            _unit(self, name)
        if not (0.0 <= self.hue <= 180.0):
            raise FacetoolError(f"loader hue must be in [0, 180] degrees, got {self.hue}")
        lo, hi = _pair(self, "crop_area")
        if not (0.5 <= lo <= hi <= 1.0):
            raise FacetoolError(
                f"loader crop_area must satisfy 0.5 <= low <= high <= 1 (aligned faces: a mild crop), got {lo, hi}"
            )
        lo, hi = _pair(self, "crop_aspect")
        if not (0.0 < lo <= hi):
            raise FacetoolError(f"loader crop_aspect must satisfy 0 < low <= high, got {lo, hi}")
        lo, hi = _pair(self, "blur_sigma")
        if not (0.0 < lo <= hi):
            raise FacetoolError(f"loader blur_sigma must satisfy 0 < low <= high, got {lo, hi}")
        lo, hi = _pair(self, "downup_scale")
        if not (0.0 < lo <= hi <= 1.0) or round(lo * self.image_size) < 1:
            raise FacetoolError(f"loader downup_scale must satisfy 0 < low <= high <= 1, got {lo, hi}")

    def replace(self, **changes) -> LoaderConfig:
        """A copy with some options changed (validated)."""
        return dataclasses.replace(self, **changes)

    def dali_threads(self, device: str, local_ranks: int | None = None) -> int:
        """DALI's worker threads: ``threads`` when set, else this rank's share of the cores, plus one when the whole
        pipeline runs on the CPU. The spare thread keeps the cores busy while a worker waits at the end of an
        operator's batch (2 cores: 3 threads gave ~8% more images/s than 2, same CPU time; BENCHMARKS.md)."""
        if self.threads:
            return self.threads
        return self.cpu_share(local_ranks) + (1 if device == "cpu" else 0)

    def cpu_share(self, local_ranks: int | None = None) -> int:
        """This rank's share of the cores it may run on (at least 1): divided among the ranks of this machine
        (``local_ranks``, default torchrun's LOCAL_WORLD_SIZE, else 1)."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if local_ranks is None:
            try:
                local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            except ValueError:
                local_ranks = 1
        return max(1, cores // max(1, local_ranks))


def _int_at_least(cfg: LoaderConfig, name: str, low: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise FacetoolError(f"loader {name} must be an integer >= {low}, got {value!r}")


def _unit(cfg: LoaderConfig, name: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, int | float) or not math.isfinite(value) or not (0.0 <= value <= 1.0):
        raise FacetoolError(f"loader {name} must be in [0, 1], got {value!r}")


def _pair(cfg: LoaderConfig, name: str) -> tuple[float, float]:
    value = getattr(cfg, name)
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise FacetoolError(f"loader {name} must be a pair (low, high), got {value!r}") from None
    return lo, hi
