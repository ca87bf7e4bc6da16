"""`facetool bench gpu`: every GPU figure in one command, each beside its reference measured in the same run.

Parts (each a module with a ``PART``, listed in :mod:`.registry`; each job of a part runs in a fresh process, so
a CUDA out-of-memory error or a crash in one loses nothing else): ``environment`` (GPU, driver, CUDA, torch,
DALI), ``fixture`` (shards made on the spot), ``loader`` (DALI mixed and CPU, masks and none, beside
decode-only), ``training`` (bf16 images/s of each backbone, model only and with the DALI loader, channels-last,
MFU), ``partial_fc`` (2M classes: memory and step time at r = 0.1 and 1), ``verification`` (embedding images/s),
``nccl`` (a one-rank process group and Partial FC through it), ``devices`` (pass/fail device-handling checks) and
``compile`` (``torch.compile`` against eager). :mod:`.plan` holds the sizes and the status rules, :mod:`.run`
the budgeted runner, :mod:`.report` the text.

    from facetool.bench.gpu import run_gpu_bench
    report = run_gpu_bench(smoke=True)            # toy sizes on the CPU, CUDA parts skipped
"""

from facetool.bench.gpu.plan import FULL, SMOKE, Job, Part, Setting, Sizes
from facetool.bench.gpu.registry import PARTS, part_names
from facetool.bench.gpu.report import describe_run, summary_lines
from facetool.bench.gpu.run import DEFAULT_MINUTES, run_gpu_bench

__all__ = [
    "DEFAULT_MINUTES",
    "FULL",
    "PARTS",
    "SMOKE",
    "Job",
    "Part",
    "Setting",
    "Sizes",
    "describe_run",
    "part_names",
    "run_gpu_bench",
    "summary_lines",
]
