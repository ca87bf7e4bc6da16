"""The DALI loader (the optional ``dali`` extra): ``pipeline`` (the epoch's graph: reader, decoder, augmentations),
``loader`` (:class:`DaliLoader`: epochs of batches, failures named by sample), ``replay`` (which samples DALI's
reader had handed out, for a resume on another layout) and ``source`` (the rest of such an epoch, fed to the same
graph)."""

from facetool.train.data.dali.loader import DaliLoader
from facetool.train.data.dali.pipeline import DALI_INSTALL, build_pipeline, dali_available, require_dali

__all__ = ["DALI_INSTALL", "DaliLoader", "build_pipeline", "dali_available", "require_dali"]
