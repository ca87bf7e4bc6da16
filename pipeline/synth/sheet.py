"""A contact sheet of synthetic faces, for the docs and for eyeballing a change to the drawing."""

from __future__ import annotations

import io

from PIL import Image

from facetool.pipeline.synth.faces import render
from facetool.pipeline.synth.identity import SIZE


def contact_sheet(seed: int = 0, identities: int = 8, images: int = 8, first: int = 0) -> Image.Image:
    """A grid of faces: one row per identity, ``images`` images of it per row (for docs and eyeballing)."""
    sheet = Image.new("RGB", (images * SIZE, identities * SIZE))
    for r in range(identities):
        for c in range(images):
            jpeg = render(seed, first + r, c)
            sheet.paste(Image.open(io.BytesIO(jpeg)).convert("RGB"), (c * SIZE, r * SIZE))
    return sheet
