"""Procedurally drawn synthetic faces, ArcFace-aligned, written as an InsightFace layout-A dataset.

The built-in dataset of the project (``facetool synth``, ``make demo``, the tests). Every identity is a
frozen set of strong, stable traits (face shape, skin tone, hair colour and style, brows, eyes, nose, lips,
ears, beard, glasses, moles); every image adds pose, expression, lighting, background, noise, blur and JPEG
variation. Faces are drawn as polygons at 2x with PIL, the pose applied to the polygon points (no image
resampling), then averaged 2x2 down to 112 (supersampling anti-aliasing; a LANCZOS resize would cost 15x as
much), so the five landmarks stay on the ArcFace 112x112 template up to the per-identity offset (<= 1.2 px)
and the per-image pose.

Determinism: identity ``i``'s traits come from ``default_rng([seed, 1, i])`` and its image ``k`` from
``default_rng([seed, 2, i, k])`` (the middle word keeps the two streams apart), so the output bytes do not
depend on the number of worker processes.

Verification set (``synth.bin``): made of held-out identities ``C .. C+E-1`` (``E = max(50, pairs // 10)``,
never among the ``C`` training identities); pair ``p`` uses image indices ``2p`` and ``2p+1`` of its
identities; the same/different flags are a seeded permutation of ``pairs // 2`` positives and the rest
negatives.

Modules: ``identity`` (traits, seeded generators), ``draw`` (the face's parts, posed and painted), ``faces`` (one
image: background, light, noise, JPEG), ``dataset`` (:func:`write_synth`), ``sheet`` (:func:`contact_sheet`).
"""

from facetool.pipeline.synth.dataset import plan_pairs, write_synth
from facetool.pipeline.synth.faces import draw_face, render, render_jpeg
from facetool.pipeline.synth.identity import SIZE, TEMPLATE, FaceIdentity, identity_rng, image_rng, make_identity
from facetool.pipeline.synth.sheet import contact_sheet

__all__ = [
    "SIZE",
    "TEMPLATE",
    "FaceIdentity",
    "contact_sheet",
    "draw_face",
    "identity_rng",
    "image_rng",
    "make_identity",
    "plan_pairs",
    "render",
    "render_jpeg",
    "write_synth",
]
