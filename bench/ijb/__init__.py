"""IJB-B / IJB-C face verification (1:1) and identification (1:N) with InsightFace's protocol.

The numbers compare with those arcface_torch's ``eval_ijbc.py`` prints (TAR at FAR 1e-6..1e-1 over template pairs)
and with InsightFace's 1:N evaluation (rank-k, TPIR at FPIR, averaged over the two galleries); the sources read
are ``recognition/arcface_torch/eval_ijbc.py``, ``recognition/_evaluation_/ijb/ijb_evals.py`` and ``ijb_1n.py``,
and ``python-package/insightface/utils/face_align.py``, in github.com/deepinsight/insightface @
7fadd420c2351d0ffa8cac403421c1a3ed733365. The modules: :mod:`.meta` (meta files), :mod:`.features` (streaming
embedding), :mod:`.protocol` (template pooling, pair scores), :mod:`.metrics` (ROC, TAR at FAR, 1:N),
:mod:`.run` (:func:`run_ijb`), :mod:`.report` (table, plot), :mod:`.synthetic` (an IJB-C-sized random set),
:mod:`.baseline` (the upstream-style loop timed beside it) and :mod:`.fixture` (a small IJB folder of synthetic
faces).
"""

from facetool.bench.ijb.fixture import write_ijb_fixture
from facetool.bench.ijb.meta import GALLERIES, TARGETS, IJBMeta, read_meta
from facetool.bench.ijb.metrics import FARS, FPIRS, Roc, identification, nearest_tar, roc, tar_at_far
from facetool.bench.ijb.protocol import ProtocolOptions, pair_scores, pool_templates, template_index, template_scores
from facetool.bench.ijb.report import format_report, plot_report
from facetool.bench.ijb.run import IJBReport, run_ijb, save_scores
from facetool.bench.ijb.synthetic import make_synthetic

__all__ = [
    "FARS",
    "FPIRS",
    "GALLERIES",
    "TARGETS",
    "IJBMeta",
    "IJBReport",
    "ProtocolOptions",
    "Roc",
    "format_report",
    "identification",
    "make_synthetic",
    "nearest_tar",
    "pair_scores",
    "plot_report",
    "pool_templates",
    "read_meta",
    "roc",
    "run_ijb",
    "save_scores",
    "tar_at_far",
    "template_index",
    "template_scores",
    "write_ijb_fixture",
]
