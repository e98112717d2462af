"""FCU-Net: a complex-valued U-Net on the Fourier cross-correlation of pattern and probe.

After Munshi et al., "Disentangling multiple scattering with deep learning: application to
strain mapping from electron diffraction patterns", npj Comput. Mater. 8, 254 (2022). The
network maps a dynamical diffraction pattern and its vacuum probe to a kinematic
structure-factor image with sharp peaks at the Bragg positions.

1. Correlation stage (no weights, :func:`fourier_correlation`): the spectra ``P`` of the
   pattern and ``Q`` of the probe; the input channels are ``P conj(Q)`` (the spectrum of
   the pattern's cross-correlation with the probe, the classical disk-detection template
   match) and, by default, ``P`` itself, which keeps what the product loses where ``Q`` is
   near zero.
2. Body: a U-Net of complex layers on the spectrum. Each level is two 3x3 complex
   convolutions, each followed by :class:`ComplexLayerNorm` and :class:`CReLU`, then
   dropout; levels below the first start with a stride-2 convolution (the pooling step),
   the decoder upsamples with a 2x2 stride-2 transposed complex convolution and
   concatenates the encoder's features of the same level (skips in the Fourier domain).
   Level ``l`` has ``min(width * 2**l, max_width)`` complex channels.
3. Output: a 1x1 complex convolution to one channel, the inverse FFT, its real part, and a
   small residual real-space convolution block.

Two shifts frame the FFTs. In real space, the detector centre ``(H // 2, W // 2)``, where
stemforge puts the central beam and the vacuum probe, is moved to pixel ``(0, 0)`` before
the FFT and back after the inverse FFT. A centred disk then correlates to a peak at its own
position (not offset by the probe's position), and the spectrum of a centrosymmetric
pattern is real, without the ``(-1)**(kx + ky)`` checkerboard a centred beam would stamp on
it and which the CReLU thresholds would have to learn around. In Fourier space, spectra are
centred (fftshift) so that the low frequencies, where most of a pattern's information sits,
form one contiguous block rather than four corners, and the stride-2 grids keep the DC term
on a grid point at every level (``N/2 -> N/4 -> ...``). Convolutions pad circularly because
a discrete spectrum is periodic in frequency.

The output is the real part of the inverse FFT, not its magnitude: it is linear in the
network's last layer, so its gradient is smooth everywhere, where ``|z|`` has a kink at 0 and
a direction that flips at each sign change, in a target that is zero almost everywhere. The
output is not clipped at 0 (that would stop gradients in the background); clip at inference
if a non-negative image is needed.

Configurations (parameters counted by :func:`count_parameters`):

- default, for CPUs: ``FCUNet()`` = depth 3, width 8, max_width 64: 242,531 parameters;
  trains in minutes on 128² patterns.
- for GPUs, close to the paper (256² patterns): ``FCUNet(depth=6, width=16, max_width=256,
  dropout=0.1, refine_width=16)``: 16.7 M parameters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stemforge.core.errors import ConfigurationError, ShapeError
from stemforge.models.complex_layers import (
    ComplexConv2d,
    ComplexConvTranspose2d,
    ComplexDropout,
    ComplexLayerNorm,
    CReLU,
    to_complex,
    to_pair,
)

__all__ = [
    "FCUNet",
    "check_pair",
    "count_parameters",
    "fourier_correlation",
    "level_widths",
    "mc_predict",
]

#: Factor on the He initialisation of the last layer (FCU-Net and UNet).
HEAD_INIT_SCALE = 0.01

#: Dropout layers that :func:`mc_predict` keeps active.
_DROPOUT_TYPES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def level_widths(depth: int, width: int, max_width: int, dropout: float) -> list[int]:
    """Validate the U-Net hyperparameters shared by :class:`FCUNet` and ``UNet``.

    Returns
    -------
    list of int
        The channels of levels ``0 .. depth``: ``min(width * 2**l, max_width)``.
    """
    for key, value, low in (("depth", depth, 1), ("width", width, 1), ("max_width", max_width, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigurationError(
                f"{key}={value!r} is not an integer >= {low}", f"pass an integer {key} >= {low}"
            )
    if max_width < width:
        raise ConfigurationError(
            f"max_width={max_width} is smaller than width={width}", "pass max_width >= width"
        )
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ConfigurationError(
            f"dropout={dropout!r} is not a probability in [0, 1)", "pass 0 <= dropout < 1"
        )
    return [min(width * 2**level, max_width) for level in range(depth + 1)]


def check_pair(pattern: torch.Tensor, probe: torch.Tensor, depth: int) -> None:
    """Raise :class:`ShapeError` unless pattern and probe fit a U-Net of ``depth`` levels.

    Both must be real ``(B, 1, H, W)`` tensors of the same ``H, W``, each divisible by
    ``2**depth``; the probe's batch is ``B`` or 1 (one vacuum probe for every pattern).
    """
    for label, tensor in (("pattern", pattern), ("probe", probe)):
        if tensor.ndim != 4 or tensor.shape[1] != 1:
            raise ShapeError(
                f"{label} has shape {tuple(tensor.shape)}, expected (B, 1, H, W)",
                "add the batch and channel axes, e.g. x[:, None] for a (B, H, W) stack",
            )
        if not tensor.is_floating_point():
            raise ShapeError(
                f"{label} has dtype {tensor.dtype}, expected a real floating-point tensor",
                "convert it with .float()",
            )
    if pattern.shape[-2:] != probe.shape[-2:] or probe.shape[0] not in (1, pattern.shape[0]):
        raise ShapeError(
            f"pattern {tuple(pattern.shape)} and probe {tuple(probe.shape)} do not match",
            "pass a probe on the pattern's grid, with the pattern's batch size or batch 1",
        )
    factor = 2**depth
    height, width = pattern.shape[-2:]
    if height % factor or width % factor:
        raise ShapeError(
            f"patterns of {height}x{width} pixels cannot be halved {depth} times",
            f"crop or pad to a multiple of {factor} (e.g. {factor * max(1, height // factor)}²) "
            "or use a smaller depth",
        )


def _spectrum(image: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal spectrum of ``image`` with its detector centre moved to the origin."""
    origin = torch.fft.ifftshift(image, dim=(-2, -1))
    return torch.fft.fftshift(torch.fft.fft2(origin, norm="ortho"), dim=(-2, -1))


def _image(spectrum: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_spectrum`: the complex image on the detector grid."""
    origin = torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1)), norm="ortho")
    return torch.fft.fftshift(origin, dim=(-2, -1))


def fourier_correlation(
    pattern: torch.Tensor, probe: torch.Tensor, *, pattern_channel: bool = True
) -> torch.Tensor:
    """The FCU-Net input stage: spectra of the pattern-probe correlation and of the pattern.

    Parameters
    ----------
    pattern, probe
        Real ``(B, 1, H, W)`` tensors, the probe centred on ``(H // 2, W // 2)``; the probe
        may have batch 1.
    pattern_channel
        Also return the pattern's own spectrum as a second channel.

    Returns
    -------
    torch.Tensor
        Complex ``(B, C, H, W)``, ``C = 2`` (or 1): ``P conj(Q)`` and ``P``, where ``P`` and
        ``Q`` are the orthonormal FFTs of pattern and probe taken about the detector centre,
        with the zero frequency at ``(H // 2, W // 2)`` (fftshift). Transformed back the
        same way, the first channel is the circular cross-correlation
        ``c(y) = sum_u pattern(u) probe(u - y + centre) / sqrt(H W)``: a probe-shaped disk
        centred on ``y`` gives a peak at ``y``, and a circular shift of the pattern shifts
        ``c`` by the same amount.
    """
    spectrum = _spectrum(pattern)
    product = spectrum * _spectrum(probe).conj()
    return torch.cat([product, spectrum] if pattern_channel else [product], dim=1)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable real parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class _ComplexBlock(nn.Sequential):
    """Two (complex 3x3 conv, layer norm, CReLU) units and dropout; the first may stride."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        # Convolutions feed a norm that removes any bias, so they carry none.
        super().__init__(
            ComplexConv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            ComplexLayerNorm(out_channels),
            CReLU(),
            ComplexConv2d(out_channels, out_channels, 3, padding=1, bias=False),
            ComplexLayerNorm(out_channels),
            CReLU(),
            ComplexDropout(dropout) if dropout > 0 else nn.Identity(),
        )


class _RealRefine(nn.Module):
    """Residual real-space block after the inverse FFT: ``x + conv(relu(conv(relu(conv x))))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 1, 1),
        )
        # Start as the identity, so early training sees the Fourier body's output unchanged.
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Refine the real ``(B, 1, H, W)`` image ``x``."""
        return x + self.body(x)


class FCUNet(nn.Module):
    """Fourier-space complex U-Net from pattern and probe to a structure-factor image.

    See the module docstring for the architecture and the choices behind it. Every norm
    follows a bias-free convolution, so the output does not depend on the overall intensity
    of the pattern (the dose), nor, with ``pattern_channel=False``, on that of the probe.

    Parameters
    ----------
    depth
        Number of stride-2 downsamplings; patterns must have sides divisible by
        ``2**depth``.
    width
        Complex channels of the first level; level ``l`` has ``min(width * 2**l,
        max_width)``. A complex channel holds two real numbers, so at equal width an
        FCU-Net has about twice the parameters of the real ``UNet``.
    max_width
        Cap on the complex channels of any level.
    dropout
        Probability of zeroing a complex coefficient after each block (0 disables it);
        > 0 is needed for :func:`mc_predict` to give an uncertainty.
    pattern_channel
        Feed the pattern's spectrum as a second input channel next to the correlation.
    refine_width
        Channels of the residual real-space block after the inverse FFT (0: no block, the
        output is the real part of the inverse FFT).
    """

    name = "fcunet"

    def __init__(
        self,
        *,
        depth: int = 3,
        width: int = 8,
        max_width: int = 64,
        dropout: float = 0.0,
        pattern_channel: bool = True,
        refine_width: int = 8,
    ) -> None:
        super().__init__()
        widths = level_widths(depth, width, max_width, dropout)
        if isinstance(refine_width, bool) or not isinstance(refine_width, int) or refine_width < 0:
            raise ConfigurationError(
                f"refine_width={refine_width!r} is not an integer >= 0",
                "pass 0 (no real-space block) or a positive number of channels",
            )
        if not isinstance(pattern_channel, bool):
            raise ConfigurationError(
                f"pattern_channel={pattern_channel!r} is not a bool", "pass True or False"
            )
        self._config: dict[str, Any] = {
            "depth": depth,
            "width": width,
            "max_width": max_width,
            "dropout": float(dropout),
            "pattern_channel": pattern_channel,
            "refine_width": refine_width,
        }
        self.depth = depth
        self.pattern_channel = pattern_channel
        in_channels = [2 if pattern_channel else 1, *widths[:-1]]
        self.encoder = nn.ModuleList(
            _ComplexBlock(c_in, c_out, 1 if level == 0 else 2, dropout)
            for level, (c_in, c_out) in enumerate(zip(in_channels, widths, strict=True))
        )
        # Decoder modules run from the deepest level up: index i serves level depth - 1 - i.
        self.up = nn.ModuleList(
            ComplexConvTranspose2d(widths[level + 1], widths[level])
            for level in reversed(range(depth))
        )
        self.decoder = nn.ModuleList(
            _ComplexBlock(2 * widths[level], widths[level], 1, dropout)
            for level in reversed(range(depth))
        )
        self.head = ComplexConv2d(widths[0], 1, 1)
        # A near-zero first output: the early steps then fit the target instead of first
        # undoing a random image of unit RMS (in a 2-sample overfit, ~10x lower loss after 40 steps).
        with torch.no_grad():
            self.head.weight.mul_(HEAD_INIT_SCALE)
        self.refine = _RealRefine(refine_width) if refine_width else None

    def config(self) -> dict[str, Any]:
        """The constructor's keyword arguments: ``FCUNet(**model.config())`` rebuilds it."""
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
        spectra = fourier_correlation(
            pattern.to(dtype), probe.to(dtype), pattern_channel=self.pattern_channel
        )
        x = to_pair(spectra)
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        skips.pop()  # the deepest level is the bottleneck, not a skip
        for up, block in zip(self.up, self.decoder, strict=True):
            x = block(torch.cat([up(x), skips.pop()], dim=2))  # axis 2: complex channels
        image = _image(to_complex(self.head(x))).real
        return image if self.refine is None else self.refine(image)


def mc_predict(
    model: nn.Module, pattern: torch.Tensor, probe: torch.Tensor, n_samples: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte Carlo dropout: mean prediction and its per-pixel standard deviation.

    The model runs in eval mode with only its dropout layers in train mode, ``n_samples``
    times without gradients; every module's train/eval state is restored afterwards. A
    model without active dropout (``dropout=0``) runs once and returns a zero std.

    Parameters
    ----------
    model
        An :class:`FCUNet`, a ``UNet``, or any module called as ``model(pattern, probe)``.
    pattern, probe
        The model's inputs, ``(B, 1, H, W)``.
    n_samples
        Stochastic forward passes (the paper averages 5 to 10).

    Returns
    -------
    mean, std
        ``(B, 1, H, W)`` each; ``std`` is the sample standard deviation (Bessel-corrected
        for ``n_samples > 1``).
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ConfigurationError(
            f"n_samples={n_samples!r} is not a positive integer", "pass n_samples >= 1"
        )
    states = {module: module.training for module in model.modules()}
    dropouts = [m for m in model.modules() if isinstance(m, _DROPOUT_TYPES) and m.p > 0]
    model.eval()
    for module in dropouts:
        module.train()
    try:
        with torch.no_grad():
            if not dropouts:
                mean = model(pattern, probe)
                return mean, torch.zeros_like(mean)
            samples = torch.stack([model(pattern, probe) for _ in range(n_samples)])
    finally:
        for module, training in states.items():
            module.training = training
    return samples.mean(dim=0), samples.std(dim=0, correction=1 if n_samples > 1 else 0)
