"""A set transformer on raw Bragg spot lists: the neural crystal identifier.

:class:`PeakSetNet` reads a pattern's spots as a set (positions about the direct beam and
intensities, padded to ``max_spots`` with a mask) and predicts the same three things as the
hierarchical forest of :mod:`stemforge.models.crystal_id`: the crystal system, the space
group (P(system) · P(group | system), so the joint sums to 1) and the lattice under each
system; :meth:`PeakSetNet.predict_peaks` returns a
:class:`~stemforge.models.crystal_id.PatternPredictions`, so :func:`aggregate` and the
identification scores treat both models alike.

Invariance by construction, not by augmentation: a spot's token sees only its radius |q| and
its intensity relative to the pattern's strongest, and the geometry between spots enters as
an attention bias computed from pair invariants (the distance |q_i − q_j|, the radius ratio
and cos mθ_ij of the angle between q_i and q_j). All of these are unchanged by in-plane
rotations and mirrors of the detector (the in-plane orientation and the side a pattern is
viewed from carry no information about the crystal), by the order of the spots and by the
intensity scale; masked padding and masked pooling leave the output independent of the
padding. This costs the network nothing it could learn from and spares it learning O(2)
from data; stacked layers combine pair relations into triplets and beyond (lattice rows,
spot nets).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from stemforge.core.errors import ConfigurationError
from stemforge.models.crystal_id import PatternPredictions, complete_lattice
from stemforge.simulate.labels import FREE_LATTICE_PARAMETERS
from stemforge.simulate.structures.record import CRYSTAL_SYSTEMS, space_group_range

#: Lattice targets are (log a, log b, log c, α, β, γ) standardised by these (Å, degrees).
LATTICE_CENTRE = (math.log(6.0),) * 3 + (90.0,) * 3
LATTICE_SCALE = (0.5,) * 3 + (15.0,) * 3

#: What an exported model records as its ``normalization``: the inputs it expects.
INPUTS: dict[str, Any] = {
    "function": "stemforge.models.peak_set.PeakSetNet.predict_peaks",
    "version": 1,
    "inputs": "spot q (Å⁻¹) about the direct beam and intensities (any scale), the "
    "max_spots strongest per pattern",
}


def _system_of_group() -> np.ndarray:
    """``(230,)`` crystal-system index of space groups 1..230."""
    out = np.zeros(230, np.int64)
    for index, system in enumerate(CRYSTAL_SYSTEMS):
        out[np.asarray(space_group_range(system)) - 1] = index
    return out


def _free_mask() -> np.ndarray:
    """``(7, 6)`` whether a lattice parameter is free in each crystal system."""
    out = np.zeros((len(CRYSTAL_SYSTEMS), 6), bool)
    for index, system in enumerate(CRYSTAL_SYSTEMS):
        out[index, list(FREE_LATTICE_PARAMETERS[system])] = True
    return out


def normalize_lattice(lattice: torch.Tensor) -> torch.Tensor:
    """``(..., 6)`` a b c (Å) α β γ (°) → the network's standardised targets."""
    centre = lattice.new_tensor(LATTICE_CENTRE)
    scale = lattice.new_tensor(LATTICE_SCALE)
    lengths = torch.log(lattice[..., :3].clamp_min(1e-3))
    return (torch.cat([lengths, lattice[..., 3:]], dim=-1) - centre) / scale


def denormalize_lattice(values: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize_lattice`."""
    raw = values * values.new_tensor(LATTICE_SCALE) + values.new_tensor(LATTICE_CENTRE)
    return torch.cat([torch.exp(raw[..., :3]), raw[..., 3:]], dim=-1)


def _rbf(x: torch.Tensor, top: float, n: int) -> torch.Tensor:
    """Gaussian radial basis expansion of ``x`` on ``n`` centres over [0, top]."""
    centres = torch.linspace(0.0, top, n, device=x.device, dtype=x.dtype)
    width = top / (n - 1)
    return torch.exp(-(((x[..., None] - centres) / width) ** 2))


class _Block(nn.Module):
    """Pre-norm self-attention (with an additive pair bias per head) and a feed-forward."""

    def __init__(self, width: int, heads: int, expansion: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.ffn = nn.Sequential(
            nn.Linear(width, expansion * width),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(expansion * width, width),
        )
        self.dropout = dropout

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, k, width = x.shape
        q, key, v = (
            self.qkv(self.norm1(x))
            .view(b, k, 3, self.heads, width // self.heads)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        attended = nn.functional.scaled_dot_product_attention(
            q, key, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.out(attended.transpose(1, 2).reshape(b, k, width))
        return x + self.ffn(self.norm2(x))


class PeakSetNet(nn.Module):
    """Crystal system, space group and lattice from one pattern's spot set (see the module).

    Parameters
    ----------
    width
        Token width.
    depth
        Attention blocks.
    heads
        Attention heads per block (``width`` must divide by it).
    expansion
        Feed-forward width as a multiple of ``width``.
    n_basis
        Radial-basis functions for the spot radius and the pair distance.
    n_harmonics
        Orders m of cos mθ in the pair features.
    pair_width
        Hidden width of the MLP that turns pair features into attention biases.
    q_max
        Detector reach (Å⁻¹) the radii are scaled by.
    max_spots
        Spots kept per pattern (the strongest) by :meth:`predict_peaks`.
    dropout
        Dropout in the feed-forward layers, attention and head.
    """

    name = "peak_set"

    def __init__(
        self,
        width: int = 96,
        depth: int = 3,
        heads: int = 4,
        expansion: int = 2,
        n_basis: int = 16,
        n_harmonics: int = 6,
        pair_width: int = 32,
        q_max: float = 1.6,
        max_spots: int = 48,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if width % heads or min(width, depth, heads, n_basis - 1, n_harmonics, max_spots) < 1:
            raise ConfigurationError(
                f"invalid peak-set network settings width={width}, depth={depth}, "
                f"heads={heads}, n_basis={n_basis}, n_harmonics={n_harmonics}, "
                f"max_spots={max_spots}",
                "use positive sizes, n_basis ≥ 2 and a width divisible by heads",
            )
        if not q_max > 0:
            raise ConfigurationError(f"q_max={q_max} is not positive", "give the reach in Å⁻¹")
        self.settings = {
            "width": int(width),
            "depth": int(depth),
            "heads": int(heads),
            "expansion": int(expansion),
            "n_basis": int(n_basis),
            "n_harmonics": int(n_harmonics),
            "pair_width": int(pair_width),
            "q_max": float(q_max),
            "max_spots": int(max_spots),
            "dropout": float(dropout),
        }
        n_systems = len(CRYSTAL_SYSTEMS)
        self.embed = nn.Sequential(
            nn.Linear(n_basis + 2, width), nn.GELU(), nn.Linear(width, width)
        )
        self.pair = nn.Sequential(
            nn.Linear(n_basis + n_harmonics + 1, pair_width),
            nn.GELU(),
            nn.Linear(pair_width, depth * heads),
        )
        self.blocks = nn.ModuleList(_Block(width, heads, expansion, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Sequential(
            nn.Linear(2 * width + 1, 2 * width),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(2 * width, n_systems + 230 + n_systems * 6),
        )
        self.register_buffer(
            "system_of_group", torch.from_numpy(_system_of_group()), persistent=False
        )
        self.register_buffer("free", torch.from_numpy(_free_mask()), persistent=False)

    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments (for the zoo export)."""
        return dict(self.settings)

    # ---- features ------------------------------------------------------------------------------

    def _features(
        self, q: torch.Tensor, intensity: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ``(B, K, n_basis + 2)`` and pair ``(B, K, K, n_basis + n_harmonics + 1)``
        invariants (see the module notes)."""
        n_basis, q_max = self.settings["n_basis"], self.settings["q_max"]
        radius = torch.linalg.vector_norm(q, dim=-1)
        peak = torch.where(mask, intensity, torch.zeros_like(intensity)).amax(dim=1, keepdim=True)
        relative = torch.where(mask, intensity / peak.clamp_min(1e-30), torch.ones_like(intensity))
        log_relative = torch.log(relative.clamp_min(1e-6)) / math.log(1e6)
        tokens = torch.cat(
            [
                _rbf(radius / q_max, 1.2, n_basis),
                relative.sqrt()[..., None],
                log_relative[..., None],
            ],
            dim=-1,
        )
        distance = torch.linalg.vector_norm(q[:, :, None] - q[:, None], dim=-1)
        radius_product = radius[:, :, None] * radius[:, None]
        cos = torch.einsum("bid,bjd->bij", q, q) / radius_product.clamp_min(1e-12)
        # cos mθ by the Chebyshev recurrence cos mθ = 2 cos θ cos (m−1)θ − cos (m−2)θ.
        harmonics = [torch.ones_like(cos), cos]
        for _ in range(self.settings["n_harmonics"] - 1):
            harmonics.append(2 * cos * harmonics[-1] - harmonics[-2])
        ratio = torch.log(radius.clamp_min(1e-6)[:, None, :] / radius.clamp_min(1e-6)[:, :, None])
        pairs = torch.cat(
            [
                _rbf(distance / q_max, 2.4, n_basis),
                torch.stack(harmonics[1:], dim=-1),
                ratio.clamp(-3, 3)[..., None],
            ],
            dim=-1,
        )
        return tokens, pairs

    # ---- network -------------------------------------------------------------------------------

    def forward(
        self, q: torch.Tensor, intensity: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Raw outputs for padded spot sets.

        Parameters
        ----------
        q
            ``(B, K, 2)`` spot positions (Å⁻¹) about the direct beam.
        intensity
            ``(B, K)`` non-negative intensities (any scale).
        mask
            ``(B, K)`` True for real spots, False for padding.

        Returns
        -------
        dict
            ``system`` ``(B, 7)`` log P(system); ``group`` ``(B, 230)`` log P(group | its
            system), normalised within each system's groups; ``lattice`` ``(B, 7, 6)``
            standardised lattice under each system (:func:`denormalize_lattice`).
        """
        mask = mask.bool()
        q = torch.where(mask[..., None], q, torch.zeros_like(q))
        tokens, pairs = self._features(q, intensity, mask)
        b, k = mask.shape
        depth, heads = self.settings["depth"], self.settings["heads"]
        bias = self.pair(pairs).view(b, k, k, depth, heads).permute(3, 0, 4, 1, 2)
        # Padding keys get −inf; a pattern with no spot at all keeps one key so that the
        # softmax stays finite (its output is masked out of the pooling anyway).
        first = torch.arange(k, device=mask.device) == 0
        keys = mask | (first[None] & ~mask.any(dim=1, keepdim=True))
        blocked = torch.zeros_like(bias[0]).masked_fill(~keys[:, None, None, :], -math.inf)
        x = self.embed(tokens)
        for layer, block in enumerate(self.blocks):
            x = block(x, bias[layer] + blocked)
        x = self.norm(x)
        weight = mask[..., None].to(x.dtype)
        count = weight.sum(dim=1)
        mean = (x * weight).sum(dim=1) / count.clamp_min(1.0)
        largest = x.masked_fill(~mask[..., None], -math.inf).amax(dim=1)
        largest = torch.where(count > 0, largest, torch.zeros_like(largest))
        size = torch.log1p(count) / math.log1p(self.settings["max_spots"])
        out = self.head(torch.cat([mean, largest, size], dim=-1))
        n_systems = len(CRYSTAL_SYSTEMS)
        system = torch.log_softmax(out[:, :n_systems], dim=-1)
        groups = out[:, n_systems : n_systems + 230]
        # log-sum-exp over each system's block of groups, broadcast back to its groups.
        index = self.system_of_group.expand(b, -1)
        top = torch.full((b, n_systems), -math.inf, device=out.device, dtype=out.dtype)
        top = top.scatter_reduce(1, index, groups, "amax").detach()
        total = torch.zeros_like(top).scatter_add(
            1, index, torch.exp(groups - top.gather(1, index))
        )
        group = groups - (top + torch.log(total)).gather(1, index)
        lattice = out[:, n_systems + 230 :].view(b, n_systems, 6)
        return {"system": system, "group": group, "lattice": lattice}

    # ---- prediction ----------------------------------------------------------------------------

    def predictions(self, outputs: dict[str, torch.Tensor]) -> PatternPredictions:
        """:meth:`forward`'s outputs as probabilities and lattices in Å and degrees."""
        system = outputs["system"].detach().double().exp()
        joint = (
            outputs["group"].detach().double()
            + outputs["system"].detach().double()[:, self.system_of_group]
        ).exp()
        free = denormalize_lattice(outputs["lattice"].detach().double()).cpu().numpy()
        lattice = np.stack(
            [
                complete_lattice(name, free[:, index, list(FREE_LATTICE_PARAMETERS[name])])
                for index, name in enumerate(CRYSTAL_SYSTEMS)
            ],
            axis=1,
        )
        return PatternPredictions(system.cpu().numpy(), joint.cpu().numpy(), lattice)

    @torch.no_grad()
    def predict_peaks(
        self,
        q: np.ndarray,
        intensity: np.ndarray,
        offsets: np.ndarray,
        batch_size: int = 1024,
    ) -> PatternPredictions:
        """Predictions straight from CSR peak lists (the strongest ``max_spots`` of each).

        Parameters
        ----------
        q, intensity, offsets
            As :class:`~stemforge.datasets.peak_lists.PeakLists` holds them.
        batch_size
            Patterns per forward pass.
        """
        from stemforge.datasets.peak_list_datamodule import pad_peak_lists

        arrays = pad_peak_lists(q, intensity, offsets, self.settings["max_spots"])
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            chunks = [
                self(*(torch.from_numpy(a[start : start + batch_size]).to(device) for a in arrays))
                for start in range(0, max(len(arrays[0]), 1), batch_size)
            ]
        finally:
            self.train(was_training)
        outputs = {key: torch.cat([c[key] for c in chunks]) for key in chunks[0]}
        return self.predictions(outputs).with_nets(q, intensity, offsets)
