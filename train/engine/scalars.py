"""Training scalars: ``scalars.jsonl`` always (what scripts and tests read), TensorBoard events beside it when
``tensorboard`` is installed; on resume both drop what the interrupted run logged after its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from facetool.pipeline.atomic import write_bytes_atomic


class ScalarLog:
    """Scalars, one JSON object per line in ``scalars.jsonl``, and the same tags as TensorBoard events beside it
    when ``tensorboard`` is installed. ``purge_after`` (a resumed run's step): what an interrupted run logged after
    that step is dropped from both, since the resumed run logs those steps again."""

    def __init__(self, folder: Path, enabled: bool, purge_after: int | None = None) -> None:
        self.writer = None
        self.file = None
        self.kind = "off"
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "scalars.jsonl"
        if purge_after is not None and path.exists():
            truncate_jsonl(path, purge_after)
        self.file = open(path, "a")  # an append stream, flushed line by line (not a published file)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.kind = f"{path} (tensorboard is not installed)"
            return
        purge = None if purge_after is None else purge_after + 1
        self.writer = SummaryWriter(str(folder), purge_step=purge)
        self.kind = f"{path} and TensorBoard in {folder}"

    def add(self, step: int, values: dict[str, float]) -> None:
        """Log ``values`` (tag -> number) at ``step``."""
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        if self.file is not None:
            self.file.write(json.dumps({"step": step, **values}) + "\n")
            self.file.flush()

    def close(self) -> None:
        """Close the log file and the TensorBoard writer."""
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the lines of ``path`` up to ``last_step`` (and drop a torn last line), atomically."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) <= last_step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the interruption
    write_bytes_atomic(path, "".join(kept))
