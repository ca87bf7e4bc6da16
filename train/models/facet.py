"""FaceT (Joint Holistic and Masked Face Recognition): a ViT on 8x8 patches with mask-conditioned prompts.

Built from timm's layers (Block, Attention, Mlp, DropPath). The mask flag of each sample picks one of two prompt
sets (holistic or masked) at every prompted layer and in the prompt pooling, so one network serves both kinds of
faces.
"""

from __future__ import annotations

import torch
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models.vision_transformer import Attention, Block
from torch import Tensor, nn

from facetool.pipeline.errors import FacetoolError

from .registry import register_backbone

NORMS = ("prenorm", "deepnorm")
INITS = ("facetool", "facet")  # the weight initialisation: facetool's own, or FaceT's (see FaceT.init_facet)


class DeepNormBlock(nn.Module):
    """Post-norm transformer block with DeepNorm's up-scaled residual: x <- LN(alpha * x + f(x)).

    Same sub-module names as timm's pre-norm ``Block`` (norm1, attn, mlp, norm2), so both share one key layout.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(self.alpha * x + self.drop_path1(self.attn(x)))
        return self.norm2(self.alpha * x + self.drop_path2(self.mlp(x)))


class PromptPool(nn.Module):
    """Prompt-based pooling: per mask state, learned queries attend over the tokens; their mean is returned.

    As in FaceT: keys are a Linear of the tokens, values the tokens themselves (split into heads), and the
    attention scale is dim^-1/2 over the full width (not the per-head width).
    """

    def __init__(self, dim: int, num_heads: int, num_queries: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.queries = nn.Parameter(torch.randn(2, num_heads, num_queries, dim // num_heads))
        self.fc = nn.Linear(dim, dim)
        self.scale = dim**-0.5

    def forward(self, x: Tensor, masked: Tensor) -> Tensor:
        """Pool tokens ``x`` (N,T,D) with the query set chosen by ``masked`` (N,) into (N,D)."""
        tokens, dim = x.shape[1], x.shape[2]
        heads = self.num_heads
        q = torch.where(masked.view(-1, 1, 1, 1), self.queries[1], self.queries[0])
        k = self.fc(x).reshape(-1, tokens, heads, dim // heads).transpose(1, 2)
        v = x.reshape(-1, tokens, heads, dim // heads).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        pooled = (attn @ v).transpose(1, 2).reshape(-1, q.shape[2], dim)
        return pooled.mean(dim=1)


class FaceT(nn.Module):
    """ViT for 112x112 faces: linear 8x8 patch embedding, learned position embedding, no class token and no final
    norm; optional deep prompts; mean pooling (prompt pooling when prompts are on); Linear -> BatchNorm1d.

    ``norm="deepnorm"`` uses post-norm blocks with alpha = (2N)^(1/4) and, following the DeepNet paper, Xavier-normal
    init with gain beta = (8N)^(-1/4) on the value projection (the v third of the fused qkv), the attention output
    projection and both MLP linears; q and k get gain 1 (N = depth). FaceT's own code scales q and k too:
    ``init="facet"`` reproduces its initialisation (:meth:`init_facet`).
    """

    stem_weight = "patch_embed.weight"  # sees the colour channels: patch vectors are (row, column, channel)

    def __init__(
        self,
        *,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        patch_size: int = 8,
        img_size: int = 112,
        embedding_size: int = 512,
        drop_path: float = 0.0,
        norm: str = "deepnorm",
        prompt_layers: int | None = None,
        prompt_tokens: int = 32,
        init: str = "facetool",
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise FacetoolError(f"norm must be one of {', '.join(NORMS)}, not {norm!r}")
        if init not in INITS:
            raise FacetoolError(f"init must be one of {', '.join(INITS)}, not {init!r}")
        prompt_layers = depth if prompt_layers is None else prompt_layers
        if not 0 <= prompt_layers <= depth:
            raise FacetoolError(f"prompt_layers must be in 0..{depth}, not {prompt_layers}")
        if img_size % patch_size or embed_dim % num_heads:
            raise FacetoolError("img_size must be a multiple of patch_size and embed_dim of num_heads")
        self.embed_dim, self.depth, self.norm = embed_dim, depth, norm
        self.patch_size, self.grid = patch_size, img_size // patch_size
        self.num_patches = self.grid**2
        self.prompt_layers, self.prompt_tokens = prompt_layers, prompt_tokens

        self.patch_embed = nn.Linear(3 * patch_size**2, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        rates = torch.linspace(0, drop_path, depth, device="cpu").tolist()  # a plain list, also when built on "meta"
        if norm == "deepnorm":
            alpha = (2 * depth) ** 0.25
            blocks = [DeepNormBlock(embed_dim, num_heads, mlp_ratio, r, alpha) for r in rates]
        else:
            blocks = [
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=r, norm_layer=nn.LayerNorm)
                for r in rates
            ]
        self.blocks = nn.ModuleList(blocks)
        if prompt_layers:
            self.prompts = nn.Parameter(torch.randn(prompt_layers, 2, prompt_tokens, embed_dim))
            self.pool: PromptPool | None = PromptPool(embed_dim, num_heads, prompt_tokens)
        else:
            self.register_parameter("prompts", None)
            self.pool = None
        self.head = nn.Sequential(nn.Linear(embed_dim, embedding_size), nn.BatchNorm1d(embedding_size, affine=False))
        if init == "facet":
            self.init_facet()
        else:
            self._init_weights()

    @property
    def uses_masked(self) -> bool:
        """Whether the mask flag changes the output (only with prompts)."""
        return self.prompt_layers > 0

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.norm == "deepnorm":
            beta = (8 * self.depth) ** -0.25
            d = self.embed_dim
            with torch.no_grad():
                for blk in self.blocks:
                    qkv = blk.attn.qkv.weight
                    nn.init.xavier_normal_(qkv[:d], gain=1.0)
                    nn.init.xavier_normal_(qkv[d : 2 * d], gain=1.0)
                    nn.init.xavier_normal_(qkv[2 * d :], gain=beta)
                    for lin in (blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
                        nn.init.xavier_normal_(lin.weight, gain=beta)

    def init_facet(self) -> None:
        """FaceT's initialisation, as ``VisionTransformer._init_vit_weights`` and its constructor do it
        (zyainfal/Joint-Holistic-and-Masked-Face-Recognition code/VIT/mim_pytorch.py L128-198 @
        3126602be561ffe114ca9a8244cfef348db13c6b): a zero position embedding (``pos_embed="learn"``, L132); every
        Linear Xavier-uniform with gain beta = (8N)^(-1/4) under DeepNorm, 1 under pre-norm (L136-141, L180-184) --
        the whole fused qkv, the attention and MLP projections, the patch embedding (FaceT's ``to_token`` Linear)
        and the prompt pooling's key Linear alike -- and zero biases; the embedding head's Linear plain Xavier-
        uniform (gain 1, L176-179: FaceT picks it as the Linear with out_features == 512, which in FaceT-B is only
        the head); LayerNorms weight 1, bias 0 (L196-198); prompts and pooling queries N(0, 1) (L53, L162), as
        drawn in the constructor. No separate std for the patch embedding, pooling or head."""
        beta = (8 * self.depth) ** -0.25 if self.norm == "deepnorm" else 1.0
        head = self.head[0]
        with torch.no_grad():
            nn.init.zeros_(self.pos_embed)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight, gain=1.0 if m is head else beta)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def patchify(self, images: Tensor) -> Tensor:
        """(N,3,H,W) -> (N, patches, p*p*3), each patch flattened in (row, column, channel) order."""
        p, g = self.patch_size, self.grid
        x = images.reshape(-1, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(-1, g * g, p * p * 3)

    def _flags(self, images: Tensor, masked: Tensor | None) -> Tensor:
        if masked is None:
            return torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
        return masked.to(device=images.device, dtype=torch.bool).reshape(-1)

    def forward_tokens(self, images: Tensor, masked: Tensor | None = None, keep: Tensor | None = None) -> Tensor:
        """Encoder tokens (N,T,D) after the last block, prompts dropped; ``keep`` (N,K) long indices selects
        the visible patches after the position embedding (for MAE pre-training), else T = all patches."""
        x = self.patch_embed(self.patchify(images)) + self.pos_embed
        if keep is not None:
            x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        flags = self._flags(images, masked).view(-1, 1, 1)
        for i, blk in enumerate(self.blocks):
            if i < self.prompt_layers:
                prompts = torch.where(flags, self.prompts[i, 1], self.prompts[i, 0])
                x = blk(torch.cat([prompts, x], dim=1))[:, self.prompt_tokens :]
            else:
                x = blk(x)
        return x

    def forward(self, images: Tensor, masked: Tensor | None = None) -> Tensor:
        """Embed ``images`` (N,3,112,112) in [-1,1]; ``masked`` (N,) bool picks each sample's prompt set."""
        x = self.forward_tokens(images, masked)
        pooled = x.mean(dim=1) if self.pool is None else self.pool(x, self._flags(images, masked))
        return self.head(pooled)

    def layer_id(self, param_name: str) -> int:
        """Layer index for layer-wise lr decay: patch/position embedding 0, block k -> k+1, the rest depth+1."""
        if param_name == "pos_embed" or param_name.startswith("patch_embed."):
            return 0
        if param_name.startswith("blocks."):
            return int(param_name.split(".")[1]) + 1
        return self.depth + 1

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay: position embedding, prompts and pooling queries."""
        names = {"pos_embed"}
        if self.prompt_layers:
            names |= {"prompts", "pool.queries"}
        return names


@register_backbone("facet_base")
def facet_base(
    embedding_size: int = 512,
    drop_path: float = 0.0,
    norm: str = "deepnorm",
    prompt_layers: int | None = None,
    prompt_tokens: int = 32,
    init: str = "facetool",
) -> FaceT:
    """FaceT-B: width 768, 12 blocks, 12 heads, 32 prompt tokens in every layer by default (86,976,512 params);
    ``init="facet"``: FaceT's own initialisation instead of facetool's."""
    return FaceT(
        embed_dim=768,
        depth=12,
        num_heads=12,
        embedding_size=embedding_size,
        drop_path=drop_path,
        norm=norm,
        prompt_layers=prompt_layers,
        prompt_tokens=prompt_tokens,
        init=init,
    )


@register_backbone("facet_small")
def facet_small(
    embedding_size: int = 512,
    drop_path: float = 0.0,
    norm: str = "deepnorm",
    prompt_layers: int | None = None,
    prompt_tokens: int = 16,
    init: str = "facetool",
) -> FaceT:
    """FaceT sized down for CPU work: width 384, 6 blocks, 6 heads, 16 prompt tokens."""
    return FaceT(
        embed_dim=384,
        depth=6,
        num_heads=6,
        embedding_size=embedding_size,
        drop_path=drop_path,
        norm=norm,
        prompt_layers=prompt_layers,
        prompt_tokens=prompt_tokens,
        init=init,
    )


@register_backbone("facet_tiny")
def facet_tiny(
    embedding_size: int = 512,
    drop_path: float = 0.0,
    norm: str = "deepnorm",
    prompt_layers: int | None = None,
    prompt_tokens: int = 8,
    init: str = "facetool",
) -> FaceT:
    """FaceT for tests and CPU demos: width 192, 4 blocks, 3 heads, 8 prompt tokens."""
    return FaceT(
        embed_dim=192,
        depth=4,
        num_heads=3,
        embedding_size=embedding_size,
        drop_path=drop_path,
        norm=norm,
        prompt_layers=prompt_layers,
        prompt_tokens=prompt_tokens,
        init=init,
    )
