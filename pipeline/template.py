"""The ArcFace alignment template: where the five landmarks of a 112x112 aligned face lie (synth draws faces on it,
the masks are placed by it)."""

from __future__ import annotations

import numpy as np

TEMPLATE_SIZE = 112
#: ArcFace 112x112 template: left eye, right eye, nose tip, left and right mouth corners.
TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
TEMPLATE.flags.writeable = False
