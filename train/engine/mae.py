"""MAE pre-training for FaceT: mask most patches, encode the visible ones, reconstruct the pixels of the rest.

As FaceT's pre-trainer does it: each sample gets its own random choice of ``mask_ratio`` of the patches (147 of
196 at 0.75); the encoder (patch embedding + its learned positions, blocks; no prompts, pooling or head) sees the
visible ones; a Linear maps them to the decoder width; mask tokens with fixed 2-D sin-cos positions join them; a
post-norm (DeepNorm) decoder of ``depth`` blocks runs over [mask tokens; visible tokens] and a Linear predicts the
masked patches' pixels. The loss is the MSE against the normalised [-1, 1] pixels of the masked patches only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from facetool.pipeline.errors import FacetoolError
from facetool.train.models.facet import DeepNormBlock, FaceT


def sincos_2d(grid: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 2-D sin-cos position embedding, (grid*grid, dim): a quarter of the channels each for sin/cos of the
    row and of the column; ``dim`` not a multiple of 4 leaves the last channels zero."""
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / max(1, quarter))
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    y, x = ys.reshape(-1, 1) * omega, xs.reshape(-1, 1) * omega
    out = torch.zeros(grid * grid, dim, dtype=torch.float64)
    out[:, : 4 * quarter] = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)
    return out.float()


class MAE(nn.Module):
    """A FaceT ``encoder`` with an MAE decoder; ``forward(images)`` returns the reconstruction loss."""

    def __init__(
        self,
        encoder: FaceT,
        mask_ratio: float = 0.75,
        decoder_depth: int = 8,
        decoder_dim: int = 516,
        decoder_heads: int = 12,
        decoder_mlp_ratio: float = 3.0,
    ) -> None:
        super().__init__()
        if not isinstance(encoder, FaceT):
            raise FacetoolError(f"MAE pre-training needs a FaceT backbone, not {type(encoder).__name__}")
        self.encoder = encoder
        self.num_patches = encoder.num_patches
        self.num_masked = int(mask_ratio * self.num_patches)
        if not 0 < self.num_masked < self.num_patches:
            raise FacetoolError(f"mask_ratio {mask_ratio} masks {self.num_masked} of {self.num_patches} patches")
        self.enc_to_dec = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, decoder_dim))
        self.register_buffer("decoder_pos", sincos_2d(encoder.grid, decoder_dim).unsqueeze(0), persistent=False)
        alpha = (2 * decoder_depth) ** 0.25
        self.decoder = nn.ModuleList(
            DeepNormBlock(decoder_dim, decoder_heads, decoder_mlp_ratio, 0.0, alpha) for _ in range(decoder_depth)
        )
        self.to_pixels = nn.Linear(decoder_dim, 3 * encoder.patch_size**2)
        beta = (8 * decoder_depth) ** -0.25
        for blk in self.decoder:
            for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
                nn.init.xavier_normal_(lin.weight, gain=beta if lin is not blk.attn.qkv else 1.0)
                nn.init.zeros_(lin.bias)
            with torch.no_grad():
                d = decoder_dim
                nn.init.xavier_normal_(blk.attn.qkv.weight[2 * d :], gain=beta)

    def choose(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Per sample, (masked, visible) patch indices from a random permutation (torch's global generator)."""
        order = torch.rand(n, self.num_patches, device=device).argsort(dim=1)
        return order[:, : self.num_masked], order[:, self.num_masked :]

    def forward(self, images: Tensor, masked_flags: Tensor | None = None) -> Tensor:
        """Mean squared error of the reconstructed masked patches (pixels in [-1, 1])."""
        n = images.shape[0]
        masked, visible = self.choose(n, images.device)
        tokens = self.encoder.forward_tokens(images, None, keep=visible)
        visible_dec = self.enc_to_dec(tokens)
        pos = self.decoder_pos.expand(n, -1, -1)
        mask_pos = torch.gather(pos, 1, masked.unsqueeze(-1).expand(-1, -1, pos.shape[-1]))
        x = torch.cat([self.mask_token.expand(n, self.num_masked, -1) + mask_pos, visible_dec], dim=1)
        for blk in self.decoder:
            x = blk(x)
        pred = self.to_pixels(x[:, : self.num_masked])
        patches = self.encoder.patchify(images)
        target = torch.gather(patches, 1, masked.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return torch.mean((pred.float() - target.float()) ** 2)


def decoder_parameters(mae: MAE) -> int:
    """Parameters outside the encoder (decoder, projections, mask token)."""
    return sum(p.numel() for n, p in mae.named_parameters() if not n.startswith("encoder."))


__all__ = ["MAE", "decoder_parameters", "sincos_2d"]
