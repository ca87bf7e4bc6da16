"""`facetool bench loader`: training-loader throughput on one machine, every contender measured in the same run.

Contenders (each in a fresh process, one after the other, so none shares the CPU with another or inherits its
threads):
- ``dali`` on the GPU (when torch sees one) and on the CPU: :class:`facetool.train.data.DaliLoader`, with its
  default threads (on the CPU one more than the cores); beside it ``dali-decode-stage``, the same pipeline cut
  after the decoder, which shows how much of the loader's cost is reading and decoding and how much is the rest
  (flip, normalisation to float32 NCHW, handing batches to torch);
- ``wds``: the webdataset fallback, one DataLoader worker per core;
- ``rec``: the InsightFace baseline, arcface_torch's loader without DALI: a torch DataLoader (one worker per core,
  shuffled, ``drop_last``) over the original ``.rec``, each record read at its offset, decoded to an RGB array,
  then ToPILImage, RandomHorizontalFlip, ToTensor and Normalize(0.5, 0.5);
- ``decode-limit``: no loader at all, a tight loop decoding the same JPEGs (already in memory) in one process per
  core, with Pillow and with torchvision's libjpeg-turbo binding; the faster is the limit.
All loaders do the same work: choose nothing (no masks), flip with p=0.5, normalise to float32 NCHW, batch, and
hand the batch to the training device. Throughput is images/s over ``batches`` batches after ``warmup``.
"""

from __future__ import annotations

import io
import mmap
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from facetool.bench.process import (
    cpu_count,
    cpu_us_per_image,
    fastest_runs,
    process_tree_cpu_seconds,
    run_isolated,
)
from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.processes import worker_init

LOADERS = ("dali", "wds", "rec", "decode")


# ---------------------------------------------------------------------------------------------------------------
# contenders (each runs inside its own process)
# ---------------------------------------------------------------------------------------------------------------
def _time_batches(batches, warmup: int, count: int, sync: Callable[[], None]) -> dict:
    """Images, seconds and CPU seconds over ``count`` batches drawn after ``warmup`` ones, cycling epochs."""
    images, t0, cpu0, drawn = 0, 0.0, None, 0
    while True:
        progressed = False
        for batch in batches():
            progressed = True
            drawn += 1
            if drawn == warmup:
                sync()
                t0, cpu0 = time.perf_counter(), process_tree_cpu_seconds()
            elif drawn > warmup:
                images += len(batch[1])
                if drawn == warmup + count:
                    sync()
                    seconds, cpu1 = time.perf_counter() - t0, process_tree_cpu_seconds()
                    cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
                    return {"images": images, "seconds": seconds, "cpu_seconds": cpu}
        if not progressed:
            raise FacetoolError("the loader yielded no batches (fewer samples than one batch?)")


def _sync_for(device: str) -> Callable[[], None]:
    if device == "gpu":
        import torch

        return torch.cuda.synchronize
    return lambda: None


def _worker_context() -> str:
    """DataLoader workers fork where the OS allows (the contender's process is fresh, with no threads yet)."""
    return "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def run_dali(
    shards_dir: str,
    device: str,
    batch_size: int,
    threads: int | None,
    warmup: int,
    batches: int,
    decode_only: bool = False,
    masked_prob: float = 0.0,
    shuffle_buffer: int | None = None,
) -> dict:
    """The DALI loader (``threads`` None: its default), or with ``decode_only`` its pipeline cut after the decoder
    (read, choose, decode; no flip, no normalisation, batches not copied out): the part of the loader's cost that
    the decode loops also pay. ``masked_prob``: the share of faces shown masked (q); ``shuffle_buffer`` None: the
    loader's default."""
    from facetool.train.data import DaliLoader, LoaderConfig, open_shards
    from facetool.train.data.dali import build_pipeline

    extra = {} if shuffle_buffer is None else {"shuffle_buffer": shuffle_buffer}
    config = LoaderConfig(
        batch_size=batch_size, threads=threads or 0, last_batch="drop", masked_prob=masked_prob, **extra
    )
    device_id = 0 if device == "gpu" else None
    if decode_only:
        pipe = build_pipeline(open_shards(shards_dir), config, device=device, device_id=device_id, decode_only=True)
        pipe.build()

        def loader():
            while True:
                yield pipe.run()
    else:
        dali = DaliLoader(open_shards(shards_dir), config, device=device, device_id=device_id)
        loader = lambda: dali  # noqa: E731
    timed = _time_batches(loader, warmup, batches, _sync_for(device))
    return {**timed, "threads": config.dali_threads(device)}


def run_wds(shards_dir: str, device: str, batch_size: int, workers: int, warmup: int, batches: int) -> dict:
    import torch

    from facetool.train.data import LoaderConfig, WdsLoader, open_shards

    config = LoaderConfig(batch_size=batch_size, workers=workers, last_batch="drop")
    target = torch.device("cuda", 0) if device == "gpu" else torch.device("cpu")
    loader = WdsLoader(open_shards(shards_dir), config, device=target, workers=workers, start_method=_worker_context())
    return {**_time_batches(lambda: loader, warmup, batches, _sync_for(device)), "workers": workers}


class ArcfaceRecDataset:
    """arcface_torch's ``MXFaceDataset`` without MXNet: per item, read the record at its offset, decode it to an
    RGB array (MXNet's ``imdecode``; Pillow here), then ToPILImage, RandomHorizontalFlip, ToTensor, Normalize.
    Like MXNet's reader, each worker process opens the file itself (on its first item)."""

    def __init__(self, rec: Path, idx: Path) -> None:
        from torchvision import transforms

        from facetool.pipeline.recordio import RecordFile

        with RecordFile(rec, idx) as records:  # the image records (layout A's header and identities left out)
            self.keys, self.offsets = records.keys.copy(), records.offsets.copy()
        self.path = Path(rec)
        self._map: tuple[int, mmap.mmap] | None = None
        self.transform = transforms.Compose(
            [
                transforms.ToPILImage(),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
            ]
        )

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_map": None}

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        import torch
        from PIL import Image

        from facetool.pipeline.recordio import read_payload, unpack_payload

        if self._map is None or self._map[0] != os.getpid():
            with open(self.path, "rb") as f:
                self._map = (os.getpid(), mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        key = int(self.keys[i])
        payload, _ = read_payload(self._map[1], int(self.offsets[i]), self.path, key)
        _, labels, image = unpack_payload(payload)
        pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
        return self.transform(pixels), torch.tensor(int(labels[0]), dtype=torch.long)


def run_rec(rec: str, idx: str, device: str, batch_size: int, workers: int, warmup: int, batches: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    dataset = ArcfaceRecDataset(Path(rec), Path(idx))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=device == "gpu",
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
        persistent_workers=workers > 0,
        multiprocessing_context=_worker_context() if workers > 0 else None,
        worker_init_fn=worker_init(os.getpid()) if workers > 0 else None,
    )
    target = torch.device("cuda", 0) if device == "gpu" else torch.device("cpu")

    def epoch():
        for images, labels in loader:
            yield images.to(target, non_blocking=True), labels.to(target, non_blocking=True)

    return {**_time_batches(epoch, warmup, batches, _sync_for(device)), "workers": workers}


def decode_loop(args: tuple[str, list[bytes], float]) -> tuple[int, float, float, float]:
    """Decode every JPEG of the list with one decoder, starting at the shared ``start`` time."""
    decoder, jpegs, start = args
    if decoder == "pillow":
        from PIL import Image

        def decode(b: bytes) -> None:
            Image.open(io.BytesIO(b)).load()
    else:
        import warnings

        import torch
        from torchvision.io import decode_jpeg

        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 warns on every call otherwise
        torch.set_num_threads(1)
        jpegs = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]

        def decode(b) -> None:
            decode_jpeg(b)

    for b in jpegs[:16]:  # warm up (imports, first allocations)
        decode(b)
    while time.time() < start:
        time.sleep(0.001)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for b in jpegs:
        decode(b)
    return len(jpegs), t0, time.perf_counter(), time.process_time() - cpu0


def read_jpegs(shards_dir: str, count: int) -> list[bytes]:
    """The image bytes of the first ``count`` samples of the shards (the order the loaders read them in)."""
    from facetool.pipeline.shards.format import IMAGE_EXTS, index_sample_lines, parse_index_line
    from facetool.train.data import open_shards

    out: list[bytes] = []
    for shard in open_shards(shards_dir).shards:
        data = shard.tar.read_bytes()
        for line in index_sample_lines(shard.index.read_bytes()):
            out += [data[m.offset : m.offset + m.size] for m in parse_index_line(line) if m.ext in IMAGE_EXTS]
            if len(out) >= count:
                return out
    return out


def run_decode(shards_dir: str, images: int, processes: int) -> dict:
    jpegs = read_jpegs(shards_dir, images)
    results = {}
    with mp.get_context(_worker_context()).Pool(processes, initializer=worker_init(os.getpid())) as pool:
        for decoder in ("pillow", "torchvision"):
            start = time.time() + 2.0  # every process has imported and warmed up by then
            chunks = [(decoder, jpegs[p::processes], start) for p in range(processes)]
            done = pool.map(decode_loop, chunks)
            n = sum(d[0] for d in done)
            seconds = max(d[2] for d in done) - min(d[1] for d in done)
            cpu = sum(d[3] for d in done)
            results[decoder] = {"images": n, "seconds": seconds, "cpu_seconds": cpu, "processes": processes}
    return results


# ---------------------------------------------------------------------------------------------------------------
def locate_rec(shards_dir: str | os.PathLike, rec: str | os.PathLike | None) -> tuple[Path, Path]:
    """The source ``.rec`` and ``.idx`` for the baseline: ``rec`` (a folder or .rec), else the manifest's source."""
    from facetool.pipeline.shards import Source, read_manifest

    if rec is None:
        rec = read_manifest(shards_dir)["source"]["path"]
        if not Path(rec).is_file():
            raise FacetoolError(f"{rec}: the shards' source .rec is not here; give it with --rec SRC")
    source = Source.locate(rec)
    return source.rec, source.idx


def _contenders(
    shards_dir: str,
    loaders: tuple[str, ...],
    devices: tuple[str, ...],
    batch_size: int,
    warmup: int,
    batches: int,
    threads: int | None,
    cores: int,
    rec_paths: tuple[Path, Path] | None,
    decode_images: int,
) -> list[tuple[str, str, Callable, tuple]]:
    """The runs to time, in order: (name, device, function, arguments), each run in a fresh process."""
    plan: list[tuple[str, str, Callable, tuple]] = []
    main_device = devices[0]
    for device in devices:
        if "dali" in loaders:
            args = (shards_dir, device, batch_size, threads, warmup, batches)
            plan.append(("dali", device, run_dali, args))
            plan.append(("dali-decode-stage", device, run_dali, (*args, True)))
    if "wds" in loaders:
        plan.append(("wds", main_device, run_wds, (shards_dir, main_device, batch_size, cores, warmup, batches)))
    if rec_paths is not None:
        args = (str(rec_paths[0]), str(rec_paths[1]), main_device, batch_size, cores, warmup, batches)
        plan.append(("rec", main_device, run_rec, args))
    if "decode" in loaders:
        plan.append(("decode-limit", "cpu", run_decode, (shards_dir, decode_images, cores)))
    return plan


def run_loader_benchmark(
    shards_dir: str | os.PathLike,
    loaders: tuple[str, ...] = LOADERS,
    devices: tuple[str, ...] = ("cpu",),
    batch_size: int = 256,
    batches: int = 100,
    warmup: int = 10,
    threads: int | None = None,
    rec: str | os.PathLike | None = None,
    repeats: int = 1,
    report: Callable[[dict], None] | None = None,
) -> dict:
    """Measure the chosen contenders ``repeats`` times (interleaved) and return the result with ratios.

    ``devices`` says where DALI runs ("gpu", "cpu" or both) and where the other loaders deliver their batches
    (the first of them). ``threads``: DALI threads (default: the loader's own), DataLoader workers and decode
    processes (default: all cores). Where DALI is not installed the others are measured and ``skipped`` says so
    (DALI alone is an error saying how to install it).
    """
    from facetool.train.data import dali_available, open_shards, require_dali

    shards_dir = str(shards_dir)
    shards = open_shards(shards_dir)  # errors (and the check) before any contender starts
    unknown = set(loaders) - set(LOADERS)
    if unknown:
        raise FacetoolError(f"unknown loader(s) {', '.join(sorted(unknown))}; choose from {', '.join(LOADERS)}")
    skipped = {}
    if "dali" in loaders and not dali_available():
        if tuple(loaders) == ("dali",):
            require_dali("bench loader --loader dali")
        loaders, skipped = tuple(k for k in loaders if k != "dali"), {"dali": "NVIDIA DALI is not installed"}
    cores = threads or cpu_count()
    rec_paths = locate_rec(shards_dir, rec) if "rec" in loaders else None
    plan = _contenders(shards_dir, loaders, devices, batch_size, warmup, batches, threads, cores, rec_paths,
                       min((warmup + batches) * batch_size, shards.samples))  # fmt: skip
    runs: dict[tuple[str, str, str], list[dict]] = {}
    for _ in range(repeats):
        for name, device, fn, args in plan:
            out = run_isolated(f"bench loader, {name}", fn, *args)
            measured = out.items() if name == "decode-limit" else [(None, out)]
            for decoder, m in measured:
                row = {"loader": name, "device": device, "images_per_s": m["images"] / m["seconds"], **m}
                row["cpu_us_per_image"] = cpu_us_per_image(m.get("cpu_seconds"), m["images"])
                if decoder:
                    row["decoder"] = decoder
                runs.setdefault((name, device, decoder or ""), []).append(row)
                if report:
                    report(row)
    results = fastest_runs(runs.values())
    return {
        "batch_size": batch_size,
        "batches": batches,
        "warmup": warmup,
        "repeats": repeats,
        "cores": cores,
        "samples": shards.samples,
        "shards": str(Path(shards_dir).resolve()),
        "results": results,
        **({"skipped": skipped} if skipped else {}),
        **_ratios(results),
    }


def _ratios(results: list[dict]) -> dict:
    """Each contender's images/s over the .rec baseline's and over the decode limit (the fastest decoder)."""
    rec = [r["images_per_s"] for r in results if r["loader"] == "rec"]
    decode = [r["images_per_s"] for r in results if r["loader"] == "decode-limit"]
    for r in results:
        r["ratio_to_rec"] = r["images_per_s"] / rec[0] if rec else None
        r["ratio_to_decode_limit"] = r["images_per_s"] / max(decode) if decode else None
    return {
        "rec_images_per_s": rec[0] if rec else None,
        "decode_limit_images_per_s": max(decode) if decode else None,
    }
