"""Other code bases' state-dict layouts of the backbones facetool builds, and ``import_model``, which turns their
released weights into a facetool backbone file (``facetool import-model``).

A layout is the key names one code base gives a network, as ordered renames onto facetool's names, and the channel
order its released weights expect. The upstream definitions (names and shapes are listed in
``tests/fixtures/layouts/``):

- ``arcface_torch``: deepinsight/insightface, recognition/arcface_torch/backbones/iresnet.py @ 7fadd420c235
  (``iresnet18`` .. ``iresnet200``); facetool's IResNet has the same names. RGB.
- ``treb1en``: TreB1eN/InsightFace_Pytorch, model.py @ 350ff7aa9c9d (``Backbone(num_layers, drop, 'ir_se')``,
  ``MobileFaceNet``). BGR: its training images are decoded by OpenCV and its ``.bin`` reader turns RGB to BGR.
- ``multiface``: KikimorMay/MultiFace, model.py @ 4df7206ec7db: TreB1eN's names and shapes, BGR the same way.
- ``facet``: zyainfal/Joint-Holistic-and-Masked-Face-Recognition, code/VIT/mim_pytorch.py (``facet_base``) and
  code/CNN/iresnet.py (arcface_torch's names) @ 3126602be561; its checkpoints nest the weights under ``model``. RGB.
- ``facetool``: facetool's own names (a bare ``torch.save(model.state_dict())`` of a facetool backbone). RGB.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from facetool.pipeline.errors import FacetoolError

from .checkpoint import read_backbone_file, save_payload, state_payload
from .facet import FaceT
from .iresnet import IResNet
from .irse import IRSE
from .mobilefacenet import MobileFaceNet
from .registry import create_backbone, list_backbones
from .state_dict import BGR, CHANNEL_ORDERS, RGB

Renames = tuple[tuple[str, str], ...]  # (regular expression, replacement), applied in order to every key

SAME: Renames = ()
IRSE_NAMES: Renames = ((r"\.res_layer\.", ".residual."), (r"\.shortcut_layer\.", ".shortcut."))
MOBILEFACENET_NAMES: Renames = (
    (r"^(conv_[345])\.model\.", r"\1."),  # a Residual's Sequential of Depth_Wise units
    (r"\.conv\.(?=(conv|bn|prelu)\.)", ".expand."),  # a Depth_Wise's 1x1 expansion (a Conv_block named conv)
    (r"\.conv_dw\.", ".dw."),
    (r"\.conv\.weight$", ".0.weight"),  # Conv_block / Linear_block (conv, bn, prelu) -> Sequential (0, 1, 2)
    (r"\.bn\.(?=\w+$)", ".1."),
    (r"\.prelu\.weight$", ".2.weight"),
)
FACET_NAMES: Renames = (
    (r"^patch_embed\.to_token\.", "patch_embed."),
    (r"^prompts_pool\.tokens$", "pool.queries"),
    (r"^prompts_pool\.", "pool."),
    (r"^class_head\.", "head."),
)


@dataclass(frozen=True)
class Layout:
    """One code base's names: renames per facetool backbone class (``None``: every class, unchanged), and the
    channel order its released weights expect."""

    name: str
    channels: str
    renames: dict[type, Renames] | None

    def renames_for(self, model: nn.Module) -> Renames | None:
        """The renames onto ``model``'s class, or None when this layout has no such network."""
        if self.renames is None:
            return SAME
        return next((r for cls, r in self.renames.items() if isinstance(model, cls)), None)


_TREB1EN = {IRSE: IRSE_NAMES, MobileFaceNet: MOBILEFACENET_NAMES}
LAYOUTS: dict[str, Layout] = {
    "arcface_torch": Layout("arcface_torch", RGB, {IResNet: SAME}),
    "treb1en": Layout("treb1en", BGR, _TREB1EN),
    "multiface": Layout("multiface", BGR, _TREB1EN),
    "facet": Layout("facet", RGB, {FaceT: FACET_NAMES, IResNet: SAME}),
    "facetool": Layout("facetool", RGB, None),
}
AUTO = "auto"


def rename(state: dict[str, Tensor], renames: Renames) -> dict[str, Tensor]:
    """``state`` with every key rewritten by ``renames`` (in order); two keys landing on one name is an error."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = key
        for pattern, replacement in renames:
            new = re.sub(pattern, replacement, new)
        if new in out:
            raise FacetoolError(f"two tensors map onto {new!r}")
        out[new] = value
    return out


def infer_options(model_cls: type, state: dict[str, Tensor]) -> dict[str, Any]:
    """Backbone options the weights decide: FaceT's prompt layers and tokens (from ``prompts``)."""
    if model_cls is FaceT:
        prompts = state.get("prompts")
        if prompts is None:
            return {"prompt_layers": 0}
        return {"prompt_layers": int(prompts.shape[0]), "prompt_tokens": int(prompts.shape[2])}
    return {}


def meta_backbone(arch: str, options: dict[str, Any]) -> nn.Module:
    """Backbone ``arch`` on the meta device: its names, shapes and dtypes without allocating its weights."""
    with torch.device("meta"):
        return create_backbone(arch, **options)


def mismatch_text(own: dict[str, Tensor], state: dict[str, Tensor]) -> str:
    """``missing K (+n more); unexpected K ...; wrong shape K (x, expected y)``: the first key of each kind, in the
    backbone's (missing, wrong shape) or the file's (unexpected) order; '' when ``state`` fits."""
    missing = [k for k in own if k not in state and not k.endswith(".num_batches_tracked")]  # see fit_state
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    parts = [f"{label} {keys[0]}" + (f" (+{len(keys) - 1} more)" if len(keys) > 1 else "")
             for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]  # fmt: skip
    if wrong:
        k = wrong[0]
        parts.append(f"wrong shape {k} ({tuple(state[k].shape)}, expected {tuple(own[k].shape)})")
    return "; ".join(parts)


def fit_state(own: dict[str, Tensor], state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` in ``own``'s order and dtypes (values unchanged where the dtype is the same); BatchNorm counters
    that files from before PyTorch 0.4.1 lack are 0, as ``load_state_dict`` itself fills them."""
    zero = torch.tensor(0, dtype=torch.long)
    return {k: state[k].to(own[k].dtype) if k in state else zero.clone() for k in own}


def layout_archs(layout: Layout) -> list[str]:
    """The registered backbones that ``layout`` names."""
    return [a for a in list_backbones() if layout.renames_for(meta_backbone(a, {})) is not None]


def fitting_layouts(state: dict[str, Tensor], arches: list[str]) -> list[str]:
    """``--arch A --layout L1|L2`` for every backbone onto which ``state`` maps exactly (for error hints)."""
    found = []
    for arch in arches:
        model = meta_backbone(arch, {})
        fits = []
        for layout in LAYOUTS.values():
            try:
                if layout.renames_for(model) is not None and not try_layout(state, arch, model, layout)[2]:
                    fits.append(layout.name)
            except FacetoolError:  # options the weights imply that this backbone refuses
                continue
        if fits:
            found.append(f"--arch {arch} --layout {'|'.join(fits)}")
    return found


def try_layout(
    state: dict[str, Tensor], arch: str, model: nn.Module, layout: Layout
) -> tuple[dict[str, Tensor], dict[str, Any], str]:
    """(``state`` fitted to ``arch`` through ``layout``'s renames, the options it implies, '' or what does not fit)."""
    renames = layout.renames_for(model) or SAME
    mapped = rename(state, renames)
    options = infer_options(type(model), mapped)
    own = (meta_backbone(arch, options) if options else model).state_dict()
    text = mismatch_text(own, mapped)
    if not text and renames and mapped.keys() == state.keys():  # facetool's names already: not this layout's
        text = f"its names are facetool's own, not {layout.name}'s"
    return (mapped if text else fit_state(own, mapped)), options, text


def import_state(
    state: dict[str, Tensor], arch: str, layout: str = AUTO, source: str = "state dict"
) -> tuple[dict[str, Tensor], dict[str, Any], Layout]:
    """Map ``state`` (named as ``layout`` names backbone ``arch``; ``auto``: the first layout that fits) onto
    facetool's names, strictly: every key and shape must fit. Returns (facetool state dict, options, layout)."""
    if layout != AUTO and layout not in LAYOUTS:
        raise FacetoolError(f"{source}: unknown layout {layout!r}; known: {', '.join([AUTO, *LAYOUTS])}")
    model = meta_backbone(arch, {})
    if layout != AUTO and LAYOUTS[layout].renames_for(model) is None:
        holds = ", ".join(layout_archs(LAYOUTS[layout]))
        raise FacetoolError(f"{source}: layout {layout} has no {arch} (it holds {holds})")
    tried = [LAYOUTS[layout]] if layout != AUTO else [t for t in LAYOUTS.values() if t.renames_for(model) is not None]
    problem = ""
    for candidate in tried:
        try:
            fitted, options, text = try_layout(state, arch, model, candidate)
        except FacetoolError as err:  # two keys renamed onto one, options the backbone refuses
            raise FacetoolError(f"{source}: {candidate.name} layout: {err}") from None
        if not text:
            return fitted, options, candidate
        problem = problem or f"not {arch} in the {candidate.name} layout: {text}"
    hint = fitting_layouts(state, list_backbones())
    found = f"; it fits {' or '.join(hint)}" if hint else ""
    raise FacetoolError(f"{source}: {problem if layout != AUTO else f'fits no layout as {arch}'}{found}")


def import_model(
    src: str | os.PathLike,
    out: str | os.PathLike,
    arch: str,
    layout: str = AUTO,
    input_channels: str | None = None,
) -> dict[str, Any]:
    """Write the weights in ``src`` (a bare state dict, a known container of one, or a facetool backbone file) as
    a facetool backbone file ``out`` of backbone ``arch``, mapped from ``layout`` (see :func:`import_state`); the
    file records the channel order (``input_channels``, default: the layout's). Returns a summary."""
    if input_channels is not None and input_channels not in CHANNEL_ORDERS:
        raise FacetoolError(f"input channels must be one of {', '.join(CHANNEL_ORDERS)}, not {input_channels!r}")
    payload = read_backbone_file(src, arch)
    state, options, found = import_state(payload["state_dict"], arch, layout, str(src))
    channels = input_channels or payload.get("input_channels") or found.channels
    options = {**payload["options"], **options}
    save_payload(out, state_payload(state, arch, options, channels))
    return {
        "source": str(src),
        "out": str(out),
        "arch": arch,
        "options": options,
        "layout": found.name,
        "input_channels": channels,
        "tensors": len(state),
        "parameters": sum(p.numel() for p in meta_backbone(arch, options).parameters()),
    }


__all__ = [
    "AUTO",
    "FACET_NAMES",
    "IRSE_NAMES",
    "LAYOUTS",
    "MOBILEFACENET_NAMES",
    "Layout",
    "fitting_layouts",
    "import_model",
    "import_state",
    "infer_options",
    "layout_archs",
    "meta_backbone",
    "rename",
    "try_layout",
]
