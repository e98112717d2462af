"""A real-valued U-Net baseline with the same inputs, output and hyperparameters as FCU-Net.

The pattern and the probe are stacked as two real-space channels; the body mirrors
:class:`~stemforge.models.fcunet.FCUNet` level for level (two 3x3 convolutions with layer
norm and ReLU per level, then dropout, stride-2 convolutions down, 2x2 transposed
convolutions up, skips by concatenation), so a comparison of the two isolates the Fourier
domain and the complex arithmetic. Convolutions pad with zeros: the detector plane is not
periodic.

Default ``UNet()`` (depth 3, width 8, max_width 64): 121,105 parameters; the GPU
configuration matching FCU-Net's, ``UNet(depth=6, width=16, max_width=256, dropout=0.1)``:
8.4 M.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stemforge.models.fcunet import HEAD_INIT_SCALE, check_pair, level_widths

__all__ = ["UNet"]


class _RealBlock(nn.Sequential):
    """Two (3x3 conv, layer norm, ReLU) units and dropout; the first may stride."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        # GroupNorm with one group is a per-sample layer norm: batch-size independent, like
        # FCU-Net's ComplexLayerNorm; it removes any conv bias.
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.GroupNorm(1, out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(1, out_channels),
            nn.ReLU(),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
        )


class UNet(nn.Module):
    """Real-space U-Net from (pattern, probe) to a structure-factor image.

    Parameters
    ----------
    depth
        Number of stride-2 downsamplings; patterns must have sides divisible by
        ``2**depth``.
    width
        Channels of the first level; level ``l`` has ``min(width * 2**l, max_width)``.
    max_width
        Cap on the channels of any level.
    dropout
        Probability of zeroing an activation after each block (0 disables it); > 0 is
        needed for :func:`~stemforge.models.fcunet.mc_predict` to give an uncertainty.
    """

    name = "unet"

    def __init__(
        self, *, depth: int = 3, width: int = 8, max_width: int = 64, dropout: float = 0.0
    ) -> None:
        super().__init__()
        widths = level_widths(depth, width, max_width, dropout)
        self._config: dict[str, Any] = {
            "depth": depth,
            "width": width,
            "max_width": max_width,
            "dropout": float(dropout),
        }
        self.depth = depth
        in_channels = [2, *widths[:-1]]
        self.encoder = nn.ModuleList(
            _RealBlock(c_in, c_out, 1 if level == 0 else 2, dropout)
            for level, (c_in, c_out) in enumerate(zip(in_channels, widths, strict=True))
        )
        # Index i serves level depth - 1 - i, from the deepest level up.
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[level + 1], widths[level], 2, stride=2)
            for level in reversed(range(depth))
        )
        self.decoder = nn.ModuleList(
            _RealBlock(2 * widths[level], widths[level], 1, dropout)
            for level in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], 1, 1)
        with torch.no_grad():  # a near-zero first output, as in FCUNet
            self.head.weight.mul_(HEAD_INIT_SCALE)

    def config(self) -> dict[str, Any]:
        """The constructor's keyword arguments: ``UNet(**model.config())`` rebuilds it."""
        return dict(self._config)

    def forward(self, pattern: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
        """Predict the structure-factor image.

        Parameters
        ----------
        pattern
            Normalised diffraction patterns, real ``(B, 1, H, W)``.
        probe
            Vacuum probes on the same grid, ``(B, 1, H, W)`` or ``(1, 1, H, W)``.

        Returns
        -------
        torch.Tensor
            Real ``(B, 1, H, W)`` in the dtype of the model's parameters.
        """
        check_pair(pattern, probe, self.depth)
        dtype = self.head.weight.dtype
        x = torch.cat([pattern, probe.expand_as(pattern)], dim=1).to(dtype)
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        skips.pop()  # the deepest level is the bottleneck, not a skip
        for up, block in zip(self.up, self.decoder, strict=True):
            x = block(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)
