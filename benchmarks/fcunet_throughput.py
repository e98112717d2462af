"""FCU-Net throughput per device: the network alone by batch size, and whole detection.

Patterns: a small factory set (``fcunet_small`` preset, pyxtal random crystals of seed
2024, 5–80 nm, the fast multislice engine, 128² px of 0.02 Å⁻¹) with Poisson noise at
1e5 e⁻ per pattern, tiled to ``--n`` patterns. *Network*: :func:`predict` (normalisation,
the network, the structure-factor map, copies to and from the device) in batches of 16,
64 and 256. *Whole detection*: :func:`find_bragg_disks_fcunet` on a datacube of the
patterns (prediction in its default batches: 16 on the CPU, up to 256 on a GPU as its
memory allows; then peak picking and Gaussian refinement on the CPU). Also the GPU model of ``conf/train/model/fcunet.yaml`` (16.7 M
parameters) at 256², random weights, network alone: its speed does not depend on them.
Each rate is timed once after a warm-up of the same call; CPU runs use ``--cpu-threads``
torch threads (2: the CI machine's cores).

    python benchmarks/fcunet_throughput.py [--model fcunet] [--devices cuda,cpu] [--n 1024]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from results_table import update_results

SECTION = "fcunet-throughput"
BATCHES = (16, 64, 256)
DOSE = 1e5
TARGET_CPU = 50.0  # patterns/s at 128² on 2 cores with the default model (issue 5)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="fcunet", help="zoo name[@version] or .safetensors")
    parser.add_argument(
        "--devices",
        default=None,
        help="comma-separated torch devices (default: cpu, and cuda if present)",
    )
    parser.add_argument("--n", type=int, default=1024, help="patterns timed on a GPU")
    parser.add_argument("--n-cpu", type=int, default=256, help="patterns timed on the CPU")
    parser.add_argument("--cpu-threads", type=int, default=2)
    parser.add_argument("--dry-run", action="store_true", help="print, do not write RESULTS.md")
    return parser.parse_args()


def factory_patterns(folder: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(n, 128, 128)`` noisy patterns tiled from 64 simulated ones, and their probe."""
    from stemforge.datasets.commands import compose_config
    from stemforge.datasets.factory import run_factory
    from stemforge.datasets.shards import ShardReader, open_dataset

    overrides = [
        f"out={folder}",
        "n_patterns=64",
        "seed=2024",
        "structures.source=random_crystals",
        "thickness.max=800",
        "engine=fast",
    ]
    run_factory(compose_config("fcunet_small", overrides))
    store = open_dataset(folder)
    reader = ShardReader(store.shard_path(0))
    try:
        cbed = np.stack([reader.image("cbed", i) for i in range(len(reader))])
        probe = reader.image("probe", 0)
    finally:
        reader.close()
    rng = np.random.default_rng(0)
    noisy = rng.poisson(cbed / cbed.sum(axis=(1, 2), keepdims=True) * DOSE).astype(np.float32)
    return np.resize(noisy, (n, *noisy.shape[1:])), probe


def rate(call: Callable[[], object], count: int, device: str) -> float:
    """Patterns per second of ``call`` over ``count`` patterns, after one warm-up call."""
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    call()
    sync()
    start = time.perf_counter()
    call()
    sync()
    return count / (time.perf_counter() - start)


def gpu_model() -> object:
    """The network of ``conf/train/model/fcunet.yaml`` (the GPU configuration)."""
    from importlib.resources import files

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    return instantiate(OmegaConf.load(files("stemforge.conf") / "train" / "model" / "fcunet.yaml"))


def measure_model(
    net: object, count: int, device: str, stack: np.ndarray, probe: np.ndarray
) -> dict:
    """Rates of a detector model on ``stack``: the network by batch size, whole detection."""
    from stemforge.core.datacube import DataCube
    from stemforge.infer.fcunet_detect import find_bragg_disks_fcunet, predict

    row = {b: rate(lambda b=b: predict(net, stack, probe, batch=b), count, device) for b in BATCHES}
    cube = DataCube.from_stack(stack)
    row["whole"] = rate(lambda: find_bragg_disks_fcunet(cube, probe, net), count, device)
    return row


def measure_network(net: object, device: str, size: int) -> dict:
    """Rates of a bare network on random ``size²`` inputs by batch size (no detection)."""
    import torch

    def run(batch: int) -> float:
        x = torch.rand(batch, 1, size, size, device=device)
        p = torch.rand(1, 1, size, size, device=device).expand(batch, -1, -1, -1)
        repeats = max(1, 1024 // batch)

        def call() -> None:
            with torch.inference_mode():
                for _ in range(repeats):
                    net(x, p)

        return rate(call, repeats * batch, device)

    return {**{b: run(b) for b in BATCHES}, "whole": None}


def measure(options: argparse.Namespace, patterns: np.ndarray, probe: np.ndarray) -> list[dict]:
    import torch

    from stemforge.infer.fcunet_detect import load_detector_model

    rows = []
    for device in options.devices.split(","):
        gpu = device.startswith("cuda")
        torch.set_num_threads(os.cpu_count() if gpu else options.cpu_threads)
        name = torch.cuda.get_device_name(device) if gpu else f"CPU, {options.cpu_threads} threads"
        count = options.n if gpu else options.n_cpu
        net = load_detector_model(options.model, device=device)
        rows.append({"device": name, "model": options.model, "pixels": "128²"})
        rows[-1].update(measure_model(net, count, device, patterns[:count], probe))
        print(rows[-1], flush=True)
        if gpu:  # the GPU architecture, at its 256² patterns
            big = gpu_model().to(device).eval()
            size = sum(p.numel() for p in big.parameters()) / 1e6
            model = f"`model=fcunet` ({size:.1f} M parameters, random weights)"
            rows.append({"device": name, "model": model, "pixels": "256²"})
            rows[-1].update(measure_network(big, device, 256))
            print(rows[-1], flush=True)
    return rows


def render(rows: list[dict], command: str) -> str:
    import torch

    def cell(value: float | None) -> str:
        return "—" if value is None else f"{value:.1f}"

    cpu = next((r for r in rows if r["device"].startswith("CPU")), None)
    lines = [
        "## FCU-Net throughput by device",
        "",
        f"Measured by `{command}` on {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, torch {torch.__version__}. "
        + __doc__.split("\n\n")[1].replace("\n", " ").replace("``", "`").replace(":func:", ""),
        "",
        "| device | model | patterns | network, batch 16 (/s) | batch 64 (/s) | batch 256 (/s) "
        "| whole detection (/s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['device']} | {r['model']} | {r['pixels']} | "
            + " | ".join(cell(r[b]) for b in BATCHES)
            + f" | {cell(r['whole'])} |"
        )
    if cpu is not None:
        lines += [
            "",
            f"CPU target ≥ {TARGET_CPU:g} patterns/s of whole detection at 128² on 2 cores: "
            f"**{cpu['whole']:.1f}** (this machine's CPU; `fcunet_accuracy.py` times the CI-like machine).",
        ]
    return "\n".join(lines)


def main() -> None:
    options = parse_args()
    os.environ.setdefault("STEMFORGE_PROGRESS", "0")
    if options.devices is None:
        import torch

        options.devices = "cuda,cpu" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as folder:
        patterns, probe = factory_patterns(Path(folder) / "set", max(options.n, options.n_cpu))
    rows = measure(options, patterns, probe)
    section = render(rows, shlex.join(["python", *sys.argv]))
    print(section)
    if not options.dry_run:
        update_results(SECTION, section)


if __name__ == "__main__":
    main()
