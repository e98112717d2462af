"""Complex-valued layers for networks that work on Fourier spectra (Trabelsi et al., 2018).

A complex feature map of ``C`` channels travels between layers as a real tensor of shape
``(B, 2, C, H, W)``: index 0 of axis 1 holds the real parts, index 1 the imaginary parts
(:func:`to_pair` and :func:`to_complex` convert). This layout costs no copy where it
matters: ``x.flatten(1, 2)`` is the ``(B, 2C, H, W)`` stack ``[real; imag]`` a real
convolution takes, skip connections concatenate along axis 2, and CReLU is a plain ReLU on
contiguous memory. (Native ``complex64`` activations were 1.8x slower to train on a CPU,
mostly in copies between the complex tensor and its real and imaginary views.) Parameters
are real tensors too, so safetensors, optimisers and ``Module.to(dtype)`` treat the weights
like those of any real network.

A complex convolution is ``(W_r + i W_i) * (x_r + i x_i) = (W_r x_r - W_i x_i) + i (W_i x_r +
W_r x_i)``. It is computed as one real convolution of ``[x_r; x_i]`` with the block kernel
``[[W_r, -W_i], [W_i, W_r]]``: the FLOPs of four real convolutions in one call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stemforge.core.errors import ConfigurationError, ShapeError

__all__ = [
    "ComplexConv2d",
    "ComplexConvTranspose2d",
    "ComplexDropout",
    "ComplexLayerNorm",
    "CReLU",
    "to_complex",
    "to_pair",
]


def to_pair(z: torch.Tensor) -> torch.Tensor:
    """Complex ``(B, C, H, W)`` to the real ``(B, 2, C, H, W)`` layout of these layers."""
    return torch.stack([z.real, z.imag], dim=1)


def to_complex(x: torch.Tensor) -> torch.Tensor:
    """Real ``(B, 2, C, H, W)`` pair layout to a complex ``(B, C, H, W)`` tensor."""
    if x.ndim != 5 or x.shape[1] != 2:
        raise ShapeError(
            f"complex feature map has shape {tuple(x.shape)}, expected (B, 2, C, H, W)",
            "build it with to_pair(z) from a complex (B, C, H, W) tensor",
        )
    return torch.complex(x[:, 0], x[:, 1])


def _complex_weight(shape: tuple[int, ...], fan_in: int) -> nn.Parameter:
    """A ``(2, *shape)`` (real, imaginary) kernel with ``E|W|^2 = 2 / fan_in`` (He, for CReLU).

    Independent normal real and imaginary parts give a Rayleigh magnitude and a uniform
    phase: Trabelsi et al.'s complex initialisation.
    """
    return nn.Parameter(torch.randn(2, *shape) / math.sqrt(fan_in))


def _bias(channels: int, bias: bool) -> nn.Parameter | None:
    """A zero ``(2, channels)`` (real, imaginary) bias, or None."""
    return nn.Parameter(torch.zeros(2, channels)) if bias else None


class ComplexConv2d(nn.Module):
    """2-D convolution with a complex kernel, on ``(B, 2, C, H, W)`` complex feature maps.

    Parameters
    ----------
    in_channels, out_channels
        Complex channels.
    kernel_size
        Side of the square kernel.
    stride
        Stride; 2 halves the grid (the pooling step of FCU-Net).
    padding
        Pixels added on each side before the convolution.
    padding_mode
        ``"circular"`` (spectra are periodic in frequency) or ``"zeros"``.
    bias
        Add a learnt complex bias per output channel.

    Attributes
    ----------
    weight
        ``(2, out, in, k, k)``: real and imaginary parts of the kernel.
    bias
        ``(2, out)`` or None.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        padding_mode: str = "circular",
        bias: bool = True,
    ) -> None:
        super().__init__()
        if padding_mode not in ("circular", "zeros"):
            raise ConfigurationError(
                f"padding_mode={padding_mode!r} is not supported", "use 'circular' or 'zeros'"
            )
        self.weight = _complex_weight(
            (out_channels, in_channels, kernel_size, kernel_size), in_channels * kernel_size**2
        )
        self.bias = _bias(out_channels, bias)
        self.stride = stride
        self.padding = padding
        self.padding_mode = padding_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``(B, 2, in, H, W)``; returns ``(B, 2, out, H', W')``."""
        wr, wi = self.weight
        kernel = torch.cat([torch.cat([wr, -wi], dim=1), torch.cat([wi, wr], dim=1)], dim=0)
        x = x.flatten(1, 2)
        padding = self.padding
        if self.padding_mode == "circular" and padding:
            x = F.pad(x, (padding,) * 4, mode="circular")
            padding = 0
        bias = None if self.bias is None else self.bias.flatten()
        y = F.conv2d(x, kernel, bias, stride=self.stride, padding=padding)
        return y.unflatten(1, (2, -1))


class ComplexConvTranspose2d(nn.Module):
    """Transposed convolution with a complex kernel (the upsampling step of FCU-Net).

    With ``kernel_size == stride`` (the default 2) every input pixel writes its own
    ``k x k`` output tile: a learnt inverse of a strided convolution.

    Parameters
    ----------
    in_channels, out_channels
        Complex channels.
    kernel_size, stride
        Kernel side and upsampling factor.
    bias
        Add a learnt complex bias per output channel.

    Attributes
    ----------
    weight
        ``(2, in, out, k, k)``: real and imaginary parts of the kernel.
    bias
        ``(2, out)`` or None.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 2,
        *,
        stride: int = 2,
        bias: bool = True,
    ) -> None:
        super().__init__()
        # Each output pixel sees in_channels * (k / stride)^2 inputs.
        fan_in = max(1, in_channels * (kernel_size // stride) ** 2)
        self.weight = _complex_weight((in_channels, out_channels, kernel_size, kernel_size), fan_in)
        self.bias = _bias(out_channels, bias)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upsample ``(B, 2, in, H, W)``; returns ``(B, 2, out, sH, sW)``."""
        wr, wi = self.weight
        # Transposed kernels are (in, out, k, k): rows are the inputs [x_r; x_i], columns
        # the outputs [y_r; y_i].
        kernel = torch.cat([torch.cat([wr, wi], dim=1), torch.cat([-wi, wr], dim=1)], dim=0)
        bias = None if self.bias is None else self.bias.flatten()
        y = F.conv_transpose2d(x.flatten(1, 2), kernel, bias, stride=self.stride)
        return y.unflatten(1, (2, -1))


class ComplexLayerNorm(nn.Module):
    """Magnitude (RMS) layer normalisation of complex feature maps, then gain and bias.

    Each sample is divided by the root mean square of ``|z|`` over its channels and pixels.
    No mean is subtracted, so every coefficient keeps its phase (subtracting a complex mean
    from a spectrum would move the DC term and every phase with it). Channel ``c`` is then
    scaled by a learnt real gain (initially 1) and shifted by a learnt complex bias
    (initially 0); a complex gain would only repeat the phase that the complex convolution
    before the norm already sets per channel.

    Why not complex batch norm: statistics of 4 to 16 samples are noisy, the 2x2 whitening
    of Trabelsi et al. needs a matrix inverse square root per channel, and running averages
    make training and inference differ, which Monte Carlo dropout (train-mode dropout in an
    eval-mode model) would mix up. A per-sample norm behaves the same at any batch size,
    batch size 1 included, and makes what follows it independent of the overall intensity
    scale of the input.

    Parameters
    ----------
    channels
        Complex channels.
    eps
        Added to the mean square magnitude; small, because the spectra of normalised
        patterns can be small numbers.
    """

    def __init__(self, channels: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(2, channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``(B, 2, C, H, W)``."""
        # Mean of |z|^2 = re^2 + im^2 is twice the mean square over both parts.
        power = 2.0 * x.square().mean(dim=(1, 2, 3, 4), keepdim=True)
        scale = torch.rsqrt(power + self.eps) * self.weight[:, None, None]
        return torch.addcmul(self.bias[:, :, None, None], x, scale)


class CReLU(nn.Module):
    """``ReLU(Re z) + i ReLU(Im z)``: the complex activation of Trabelsi et al.

    Chosen over modReLU (``ReLU(|z| + b) z / |z|``): it has no singular gradient at
    ``z = 0``, no per-channel threshold to learn before the network stops being linear, and
    Trabelsi et al. found it the most accurate of the activations they compared; FCU-Net
    uses it too. On the ``(B, 2, C, H, W)`` layout it is a plain ReLU.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the activation to ``(B, 2, C, H, W)``."""
        return F.relu(x)


class ComplexDropout(nn.Dropout):
    """Dropout of whole complex coefficients (real and imaginary part together).

    A subclass of :class:`torch.nn.Dropout`, so code that switches dropout on for Monte
    Carlo inference finds it like any other dropout layer.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Zero coefficients of ``(B, 2, C, H, W)`` with probability ``p``, rescale the rest."""
        if not self.training or self.p == 0.0:
            return x
        mask = F.dropout(x.new_ones(x.shape[0], 1, *x.shape[2:]), self.p, training=True)
        return x * mask
