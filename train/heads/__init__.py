"""Margin heads and Partial FC: ``create_head(name, embedding_size, num_classes, **options)``.

``head(embeddings, labels)`` is the training loss (mean over the global batch); ``head.logits(embeddings,
labels)`` the scaled, margin-adjusted logits (a list, one per sphere, for MultiFace). ``partial_fc=True`` shards the
class weight by rows over the ranks of torch.distributed; see docs/PARTIAL_FC.md.
"""

from .base import HEADS, Batch, Head, create_head, list_heads, register_head
from .distributed import Shard, all_gather_rows, class_shard, sharded_cross_entropy
from .heads import ArcFace, CosFace, CurricularFace, MagFace, MultiFace, Softmax

__all__ = [
    "ArcFace",
    "Batch",
    "CosFace",
    "CurricularFace",
    "HEADS",
    "Head",
    "MagFace",
    "MultiFace",
    "Shard",
    "Softmax",
    "all_gather_rows",
    "class_shard",
    "create_head",
    "list_heads",
    "register_head",
    "sharded_cross_entropy",
]
