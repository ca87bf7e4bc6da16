"""MXNet RecordIO as InsightFace writes it, read and written without MXNet.

``format`` holds the framing and the ``IRHeader`` payloads, ``index`` loads the ``.idx`` and checks its entries,
``reader`` the memory-mapped :class:`RecordFile` (layouts A and B) and the ``property`` file, ``writer`` the
:class:`RecordIOWriter` and :func:`write_layout_a`, the one way facetool writes a whole InsightFace layout-A dataset
(``facetool synth`` and the tests' fixtures).
"""

from facetool.pipeline.recordio.format import (
    IR_HEADER,
    JPEG_SIGNATURE,
    LENGTH_MASK,
    MAGIC,
    MAGIC_BYTES,
    PNG_SIGNATURE,
    IRHeader,
    Record,
    RecordIOError,
    frame_record,
    image_extension,
    pack_payload,
    read_payload,
    unpack_payload,
)
from facetool.pipeline.recordio.index import IndexProblem, load_index
from facetool.pipeline.recordio.reader import RecordFile, read_property
from facetool.pipeline.recordio.writer import RecordIOWriter, write_layout_a

__all__ = [
    "IR_HEADER",
    "JPEG_SIGNATURE",
    "LENGTH_MASK",
    "MAGIC",
    "MAGIC_BYTES",
    "PNG_SIGNATURE",
    "IRHeader",
    "IndexProblem",
    "Record",
    "RecordFile",
    "RecordIOError",
    "RecordIOWriter",
    "frame_record",
    "image_extension",
    "load_index",
    "pack_payload",
    "read_payload",
    "read_property",
    "unpack_payload",
    "write_layout_a",
]
