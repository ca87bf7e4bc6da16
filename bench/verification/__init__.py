"""Face verification with InsightFace's protocol (or FaceT's, :mod:`.protocol`), so the numbers compare with
published ones.

Every image and its horizontal flip are embedded, the two embeddings summed and L2-normalised; pair k is images
(2k, 2k+1) of a ``.bin`` set. The distance is the squared L2 distance of the normalised embeddings. Accuracy:
10 contiguous folds, the threshold chosen among ``arange(0, 4, 0.01)`` on nine folds, accuracy measured on the
tenth, as InsightFace's ``verification.py`` does; beyond that protocol TAR at FAR 1e-1..1e-4, the ROC curve, its
area and the equal error rate.

- :mod:`.metrics`: the metrics, in numpy alone;
- :mod:`.sets`: ``.bin`` sets, their masked versions, pair folders, and :func:`load_sets`;
- :mod:`.embed`: loading a backbone, embedding a set, the metrics of a model or of given embeddings;
- :mod:`.protocol`: the protocols (``insightface``, ``facet``): folds, flip, normalisation and masked flags;
- :mod:`.report`: the JSON report, the table and the ROC plot;
- :mod:`.run`: :func:`run_verification`, what ``facetool bench verification`` does, as a library call.
"""

from .embed import (
    DEFAULT_BATCH,
    IMAGE_SIZE,
    check_sets,
    decode_face,
    default_batch_size,
    embed_set,
    evaluate_features,
    evaluate_model,
    evaluate_set,
    load_features,
    load_model,
    resolve_device,
    retain_freed_memory,
)
from .metrics import (
    FAR_EXPONENTS,
    FOLDS,
    THRESHOLDS,
    SetMetrics,
    embedding_metrics,
    equal_error_rate,
    far_key,
    fold_sizes,
    fuse_flip,
    kfold_accuracy,
    l2_normalize,
    pair_metrics,
    roc_auc,
    roc_curve,
    tar_at_far,
)
from .protocol import FACET, INSIGHTFACE, PROTOCOLS, TRAINING_SCALE, Protocol, get_protocol
from .report import Report, format_table, plot_roc, protocol_line, report_json, timing_line
from .run import run_verification, training_evaluation
from .sets import (
    KNOWN_SETS,
    PAIRS_FILE,
    PairSet,
    bin_dir_paths,
    canonical_set_name,
    check_unique_names,
    known_set_warnings,
    load_sets,
    masked_bin_set,
    read_bin_set,
    read_pairs_dir,
    set_order,
)

__all__ = [
    "DEFAULT_BATCH",
    "FACET",
    "FAR_EXPONENTS",
    "FOLDS",
    "IMAGE_SIZE",
    "INSIGHTFACE",
    "KNOWN_SETS",
    "PAIRS_FILE",
    "PROTOCOLS",
    "THRESHOLDS",
    "TRAINING_SCALE",
    "PairSet",
    "Protocol",
    "Report",
    "SetMetrics",
    "bin_dir_paths",
    "canonical_set_name",
    "check_sets",
    "check_unique_names",
    "decode_face",
    "default_batch_size",
    "embed_set",
    "embedding_metrics",
    "equal_error_rate",
    "evaluate_features",
    "evaluate_model",
    "evaluate_set",
    "far_key",
    "fold_sizes",
    "format_table",
    "fuse_flip",
    "get_protocol",
    "kfold_accuracy",
    "known_set_warnings",
    "l2_normalize",
    "load_features",
    "load_model",
    "load_sets",
    "masked_bin_set",
    "pair_metrics",
    "plot_roc",
    "protocol_line",
    "read_bin_set",
    "read_pairs_dir",
    "report_json",
    "resolve_device",
    "retain_freed_memory",
    "roc_auc",
    "roc_curve",
    "run_verification",
    "set_order",
    "tar_at_far",
    "timing_line",
    "training_evaluation",
]
