"""FCU-Net, its complex layers, the real U-Net baseline and Monte Carlo dropout."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

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
from stemforge.models.fcunet import FCUNet, fourier_correlation, mc_predict
from stemforge.models.unet import UNet

TINY = {"depth": 2, "width": 4, "max_width": 16}


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: threads only add overhead, and the CPU is shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _complex(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(*shape, generator=g), torch.randn(*shape, generator=g))


def _inputs(batch: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, size, size, generator=g), torch.rand(1, 1, size, size, generator=g)


def _inverse(spectrum: torch.Tensor) -> torch.Tensor:
    """Back to the detector grid, as documented in fourier_correlation."""
    image = torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1)), norm="ortho")
    return torch.fft.fftshift(image, dim=(-2, -1))


# --- complex layers -------------------------------------------------------------------------


@pytest.mark.parametrize("padding_mode", ["circular", "zeros"])
@pytest.mark.parametrize("stride", [1, 2])
def test_complex_conv_is_the_complex_product(padding_mode: str, stride: int) -> None:
    torch.manual_seed(0)
    conv = ComplexConv2d(3, 4, 3, stride=stride, padding=1, padding_mode=padding_mode)
    with torch.no_grad():
        conv.bias.normal_()
    z = _complex(2, 3, 6, 8)
    weight = torch.complex(conv.weight[0], conv.weight[1]).detach()
    bias = torch.complex(conv.bias[0], conv.bias[1]).detach()
    # Reference in torch complex arithmetic: sum over taps of W[o, c, dy, dx] z[c, y+dy-1, x+dx-1].
    mode = {"circular": "circular", "zeros": "constant"}[padding_mode]
    padded = F.pad(to_pair(z).flatten(1, 2), (1, 1, 1, 1), mode=mode)
    padded = to_complex(padded.unflatten(1, (2, -1)))
    expected = sum(
        torch.einsum("oc,bcyx->boyx", weight[:, :, dy, dx], padded[:, :, dy : dy + 6, dx : dx + 8])
        for dy in range(3)
        for dx in range(3)
    )
    expected = (expected + bias[:, None, None])[:, :, ::stride, ::stride]
    got = to_complex(conv(to_pair(z)))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_complex_transposed_conv_is_the_complex_product() -> None:
    torch.manual_seed(1)
    up = ComplexConvTranspose2d(3, 2)
    with torch.no_grad():
        up.bias.normal_()
    z = _complex(2, 3, 4, 5)
    weight = torch.complex(up.weight[0], up.weight[1]).detach()
    bias = torch.complex(up.bias[0], up.bias[1]).detach()
    # Each input pixel (i, j) writes the 2x2 tile out[2i + p, 2j + q] = sum_c z[c, i, j] W[c, o, p, q].
    tiles = torch.einsum("bcij,copq->boipjq", z, weight).reshape(2, 2, 8, 10)
    got = to_complex(up(to_pair(z)))
    torch.testing.assert_close(got, tiles + bias[:, None, None], rtol=1e-5, atol=1e-5)


def test_complex_layer_norm_keeps_phase_and_sets_unit_rms() -> None:
    z = 1e-4 * _complex(3, 4, 5, 5)
    out = to_complex(ComplexLayerNorm(4)(to_pair(z)))
    ratio = out / z  # a positive real number per sample
    torch.testing.assert_close(ratio.imag, torch.zeros_like(ratio.imag), atol=1e-3, rtol=0)
    assert torch.all(ratio.real > 0)
    rms = out.abs().square().mean(dim=(1, 2, 3)).sqrt()
    torch.testing.assert_close(rms, torch.ones(3), rtol=1e-4, atol=0)  # eps: 1e-12 vs 2e-8


def test_crelu_and_complex_dropout_act_on_whole_coefficients() -> None:
    z = _complex(2, 3, 8, 8)
    out = to_complex(CReLU()(to_pair(z)))
    torch.testing.assert_close(out, torch.complex(z.real.clamp(min=0), z.imag.clamp(min=0)))
    dropout = ComplexDropout(0.5)
    dropped = to_complex(dropout(to_pair(z)))
    zero_real, zero_imag = dropped.real == 0, dropped.imag == 0
    assert zero_real.any() and torch.equal(zero_real, zero_imag)
    torch.testing.assert_close(dropped[~zero_real], 2 * z[~zero_real])
    assert torch.equal(dropout.eval()(to_pair(z)), to_pair(z))


# --- correlation stage ----------------------------------------------------------------------


def test_fourier_correlation_is_the_circular_cross_correlation() -> None:
    pattern, probe = torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8)
    spectra = fourier_correlation(pattern, probe)
    assert spectra.shape == (1, 2, 8, 8) and spectra.is_complex()
    corr = _inverse(spectra[:, 0]).real[0]
    # c(y) = sum_u pattern(u) probe(u - y + centre) / 8; roll(probe, y - centre)[u] = probe(u - y + centre).
    expected = torch.stack(
        [
            torch.stack(
                [(pattern[0, 0] * probe[0, 0].roll((y - 4, x - 4), (0, 1))).sum() for x in range(8)]
            )
            for y in range(8)
        ]
    )
    torch.testing.assert_close(corr, expected / 8, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_inverse(spectra[:, 1]).real, pattern[:, 0], rtol=1e-4, atol=1e-5)


def test_fourier_correlation_is_shift_equivariant_and_peaks_on_the_disk() -> None:
    size = 32
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    probe = (((y - size // 2) ** 2 + (x - size // 2) ** 2) <= 9).float()[None, None]
    pattern = probe.roll((5, -7), (-2, -1)) + 0.1 * torch.rand(1, 1, size, size)
    corr = _inverse(fourier_correlation(pattern, probe, pattern_channel=False)[:, 0]).real
    peak = divmod(int(corr.argmax()), size)
    assert peak == (size // 2 + 5, size // 2 - 7)
    shifted = _inverse(fourier_correlation(pattern.roll((3, 11), (-2, -1)), probe)[:, 0]).real
    torch.testing.assert_close(shifted, corr.roll((3, 11), (-2, -1)), rtol=1e-4, atol=1e-4)


# --- networks -------------------------------------------------------------------------------

CASES = [
    (FCUNet, {"depth": 1, "width": 2, "max_width": 4}, 8),
    (FCUNet, {"depth": 2, "width": 4, "max_width": 8, "pattern_channel": False}, 24),
    (FCUNet, {"depth": 3, "width": 2, "max_width": 8, "refine_width": 0}, 16),
    (UNet, {"depth": 1, "width": 2, "max_width": 4}, 8),
    (UNet, {"depth": 3, "width": 4, "max_width": 8}, 24),
]


@pytest.mark.parametrize(("cls", "config", "size"), CASES)
def test_output_shape_and_dtype(cls: type, config: dict, size: int) -> None:
    model = cls(**config)
    pattern, probe = _inputs(3, size)
    out = model(pattern, probe)  # probe of batch 1 serves the whole batch
    assert out.shape == (3, 1, size, size) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out64 = model(pattern.double(), probe.expand(3, -1, -1, -1).double())
    torch.testing.assert_close(out64, out)


@pytest.mark.parametrize("cls", [FCUNet, UNet])
def test_bad_inputs_raise_shape_errors(cls: type) -> None:
    model = cls(**TINY)
    pattern, probe = _inputs(2, 16)
    with pytest.raises(ShapeError, match="multiple of 4"):
        model(pattern[..., :14, :14], probe[..., :14, :14])
    with pytest.raises(ShapeError, match=r"expected \(B, 1, H, W\)"):
        model(pattern[:, 0], probe)
    with pytest.raises(ShapeError, match="do not match"):
        model(pattern, probe[..., :8, :8])
    with pytest.raises(ShapeError, match="do not match"):
        model(pattern, torch.rand(3, 1, 16, 16))
    with pytest.raises(ShapeError, match="floating-point"):
        model(pattern.to(torch.complex64), probe)


@pytest.mark.parametrize(
    "bad",
    [
        {"depth": 0},
        {"width": 2.5},
        {"max_width": 2, "width": 4},
        {"dropout": 1.0},
        {"dropout": "0.1"},
        {"depth": True},
    ],
)
@pytest.mark.parametrize("cls", [FCUNet, UNet])
def test_bad_config_raises(cls: type, bad: dict) -> None:
    with pytest.raises(ConfigurationError):
        cls(**bad)


def test_bad_fcunet_options_raise() -> None:
    with pytest.raises(ConfigurationError, match="refine_width"):
        FCUNet(refine_width=-1)
    with pytest.raises(ConfigurationError, match="pattern_channel"):
        FCUNet(pattern_channel="yes")


@pytest.mark.parametrize(
    ("cls", "config"),
    [(FCUNet, {**TINY, "dropout": 0.1, "pattern_channel": False, "refine_width": 3}), (UNet, TINY)],
)
def test_config_round_trip(cls: type, config: dict) -> None:
    torch.manual_seed(0)
    model = cls(**config)
    assert cls.name == {"FCUNet": "fcunet", "UNet": "unet"}[cls.__name__]
    restored = json.loads(json.dumps(model.config()))
    assert restored == model.config() and restored == {**cls().config(), **config}
    twin = cls(**restored)
    twin.load_state_dict(model.state_dict())
    pattern, probe = _inputs(2, 16)
    torch.testing.assert_close(twin.eval()(pattern, probe), model.eval()(pattern, probe))


def test_fcunet_ignores_the_pattern_intensity_scale() -> None:
    # Every norm follows a bias-free convolution, so a common scale of the inputs cancels.
    torch.manual_seed(0)
    pattern, probe = _inputs(2, 16)
    model = FCUNet(**TINY)
    expected = model(pattern, probe)
    torch.testing.assert_close(model(1e3 * pattern, probe), expected, rtol=1e-4, atol=1e-6)
    # Without the pattern channel, the probe's scale cancels too.
    model = FCUNet(**TINY, pattern_channel=False)
    expected = model(pattern, probe)
    torch.testing.assert_close(model(1e3 * pattern, 1e-2 * probe), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cls", [FCUNet, UNet])
def test_mc_predict(cls: type) -> None:
    torch.manual_seed(0)
    pattern, probe = _inputs(2, 16)
    model = cls(**TINY, dropout=0.2).train()
    mean, std = mc_predict(model, pattern, probe, 4)
    assert mean.shape == std.shape == (2, 1, 16, 16)
    assert (std > 0).float().mean() > 0.5
    assert all(m.training for m in model.modules())  # modes restored
    model.eval()
    mc_predict(model, pattern, probe, 2)
    assert not any(m.training for m in model.modules())

    deterministic = cls(**TINY).train()
    mean, std = mc_predict(deterministic, pattern, probe, 3)
    assert torch.equal(std, torch.zeros_like(std))
    torch.testing.assert_close(mean, deterministic.eval()(pattern, probe))
    with pytest.raises(ConfigurationError, match="n_samples"):
        mc_predict(model, pattern, probe, 0)


def _example(size: int, a: tuple[int, int], b: tuple[int, int], seed: int) -> torch.Tensor:
    """(pattern, probe, target) of a lattice of probe disks and its Gaussian peaks."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    c = size // 2
    probe = (((y - c) ** 2 + (x - c) ** 2) <= 2.5**2).float()
    pattern, target = torch.zeros(size, size), torch.zeros(size, size)
    for i in range(-3, 4):
        for j in range(-3, 4):
            py, px = c + i * a[0] + j * b[0], c + i * a[1] + j * b[1]
            if 3 <= py < size - 3 and 3 <= px < size - 3:
                w = 1.0 if i == j == 0 else 0.2 + 0.6 * float(torch.rand(1, generator=g))
                pattern += w * probe.roll((py - c, px - c), (0, 1))
                target += w * torch.exp(-((y - py) ** 2 + (x - px) ** 2) / (2 * 0.8**2))
    return torch.stack([pattern, probe, target])[:, None]


@pytest.mark.parametrize("cls", [FCUNet, UNet])
def test_tiny_overfit(cls: type) -> None:
    data = torch.stack([_example(32, (7, 0), (0, 7), 1), _example(32, (6, 3), (-3, 6), 2)], 1)
    pattern, probe, target = data
    torch.manual_seed(0)
    model = cls(**TINY)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        optimiser.zero_grad()
        loss = F.mse_loss(model(pattern, probe), target)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5
