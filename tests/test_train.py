"""Training: data module, peak metric, Hydra configs and real tiny runs end to end.

The dataset is synthetic but shaped like the factory's output (lattices of probe disks and
Gaussian structure-factor peaks, 32² pixels, 8 structures × 4 samples), built through the
real shard builder; the networks are the real FCU-Net and U-Net at their smallest.
"""

import csv
import hashlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import cloudpickle
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf, open_dict
from safetensors import safe_open
from safetensors.torch import load_file

from stemforge.core.errors import ConfigurationError, MissingFileError
from stemforge.datasets.build import build_dataset
from stemforge.datasets.datamodule import (
    NORMALIZATION,
    FCUNetDataModule,
    normalize_inputs,
    normalize_target,
    structure_factor_image,
)
from stemforge.datasets.shards import open_dataset
from stemforge.datasets.torch_dataset import ShardDataset
from stemforge.models.fcunet import FCUNet
from stemforge.models.unet import UNet
from stemforge.simulate.sample import PEAK_DTYPE, Sample
from stemforge.train.commands import train as train_command
from stemforge.train.module import FCUNetModule, PeakAccuracy, find_peaks, match_peaks
from stemforge.train.run import compose_config, config_dir, load_initial_weights, main

# dask workers cannot import test modules: send this module's functions by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

N_PIXELS = 32
N_STRUCTURES = 8
PER_STRUCTURE = 4
SIGMA = 0.75  # px, width of the target's peaks, as the factory's kinematic images

EXPERIMENTS = [None, "fcunet_small", "fcunet", "unet_small"]
TRAINERS = ["cpu", "gpu", "ddp", "ddp_spawn"]
LOGGERS = ["wandb", "csv"]
LAUNCHERS = [None, "joblib", "submitit_slurm"]
MODELS = {"fcunet_small": FCUNet, "fcunet": FCUNet, "unet_small": UNet, "unet": UNet}
# Crystal identification: its own experiments, models and data (tests/test_crystal_id*.py).
CRYSTAL_ID = {
    "experiment": ["crystal_id_nn", "crystal_id_rf"],
    "model": ["crystal_id_nn", "crystal_id_rf"],
}
# the smallest networks that run on 32² patterns
TINY = {
    "fcunet_small": ["model.depth=2", "model.width=4", "model.max_width=8", "model.refine_width=4"],
    "unet_small": ["model.depth=2", "model.width=4", "model.max_width=8"],
}


def _gaussians(x, y, positions, heights):
    d2 = (x[..., None] - positions[:, 0]) ** 2 + (y[..., None] - positions[:, 1]) ** 2
    return (heights * np.exp(-d2 / (2 * SIGMA**2))).sum(-1)


def _disks(x, y, positions, weights, radius):
    r = np.hypot(x[..., None] - positions[:, 0], y[..., None] - positions[:, 1])
    return (weights * np.clip(radius + 0.5 - r, 0, 1)).sum(-1)


def _simulate(task: SimpleNamespace) -> list[Sample]:
    """One 2D lattice per structure; its samples differ in probe size and intensities."""
    lattice = np.random.default_rng(100 + task.index)
    angle, opening = lattice.uniform(0, np.pi), lattice.uniform(np.pi / 3, 2 * np.pi / 3)
    a1 = lattice.uniform(5.5, 8) * np.array([np.cos(angle), np.sin(angle)])
    a2 = lattice.uniform(5.5, 8) * np.array([np.cos(angle + opening), np.sin(angle + opening)])
    h, k = (v.ravel() for v in np.meshgrid(np.arange(-5, 6), np.arange(-5, 6)))
    centre = N_PIXELS // 2
    positions = centre + h[:, None] * a1 + k[:, None] * a2
    inside = ((positions >= 1) & (positions <= N_PIXELS - 2)).all(axis=1)
    h, k, positions = h[inside], k[inside], positions[inside]
    g2 = ((positions - centre) ** 2).sum(axis=1)
    central = (h == 0) & (k == 0)
    amplitude = np.where(central, 1.0, lattice.uniform(0.1, 0.6, len(h)) * np.exp(-g2 / 300))
    x, y = np.meshgrid(
        np.arange(N_PIXELS, dtype=float), np.arange(N_PIXELS, dtype=float), indexing="ij"
    )
    rng = np.random.default_rng(task.seed)
    samples = []
    for j in range(PER_STRUCTURE):
        radius = rng.uniform(1.5, 2.5)
        probe = _disks(x, y, np.array([[centre, centre]]), np.ones(1), radius)
        cbed = _disks(x, y, positions, amplitude ** (2 - 0.3 * j), radius)
        peaks = np.zeros(len(h), PEAK_DTYPE)
        peaks["h"], peaks["k"] = h, k
        peaks["qx"], peaks["qy"] = positions[:, 0], positions[:, 1]
        peaks["intensity_kinematic"] = amplitude**2
        meta = {
            "structure_id": f"synthetic-{task.index}",
            "q_pixel_size": 0.04,
            "thickness": 50.0 * (j + 1),
            "dose": None,
        }
        samples.append(
            Sample(
                (0.9 * cbed / cbed.sum()).astype(np.float32),
                (probe / probe.sum()).astype(np.float32),
                _gaussians(x, y, positions, amplitude).astype(np.float32),
                peaks,
                meta,
            )
        )
    return samples


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    tasks = [SimpleNamespace(index=i, seed=i, n_samples=PER_STRUCTURE) for i in range(N_STRUCTURES)]
    out = tmp_path_factory.mktemp("train") / "ds"
    return build_dataset(
        out,
        tasks,
        _simulate,
        config={"synthetic": True},
        seed=0,
        samples_per_shard=8,
        n_workers=1,
        progress=False,
    )


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("STEMFORGE_PROGRESS", "0")


def _run(dataset: Path, run_dir: Path, *overrides: str, experiment: str = "fcunet_small") -> Path:
    """One training run through the Hydra application, tiny and quiet; returns its folder."""
    main(
        [
            f"experiment={experiment}",
            *TINY[experiment],
            f"data.path={dataset}",
            "data.splits=[0.5,0.25,0.25]",
            "data.batch_size=8",
            "data.num_workers=0",
            "logger=csv",
            "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            f"hydra.run.dir={run_dir}",
            *overrides,
        ]
    )
    return run_dir


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(next(run_dir.glob("csv/version_*/metrics.csv")), newline="") as f:
        return list(csv.DictReader(f))


# ---- normalisation and data ------------------------------------------------------------------
def test_normalize_inputs_is_dose_free_and_the_same_for_numpy_and_torch():
    rng = np.random.default_rng(0)
    pattern, probe = rng.random((2, 3, 16, 16)).astype(np.float32)
    pattern[0, 0, 0] = -1.0  # background-subtracted data: negatives count as zero
    n_pattern, n_probe = normalize_inputs(pattern, probe)
    t_pattern, t_probe = normalize_inputs(torch.from_numpy(pattern), torch.from_numpy(probe))
    assert isinstance(t_pattern, torch.Tensor) and t_pattern.dtype == torch.float32
    np.testing.assert_allclose(t_pattern.numpy(), n_pattern, rtol=1e-6)
    np.testing.assert_allclose(t_probe.numpy(), n_probe, rtol=1e-6)
    # counts at any dose (or any gain) give the same input
    counts, _ = normalize_inputs(pattern * 1e7, probe)
    np.testing.assert_allclose(counts, n_pattern, rtol=1e-5)
    assert n_pattern[0, 0, 0] == 0 and np.allclose((n_pattern**2).mean(axis=(-2, -1)), 1, rtol=1e-5)
    # an empty image stays empty instead of turning into NaN; integers become float32
    empty, ints = normalize_inputs(np.zeros((4, 4)), np.ones((4, 4), dtype=np.uint16))
    assert not empty.any() and ints.dtype == np.float32 and np.allclose(ints, 1)
    target = np.zeros((2, 8, 8), np.float32)
    target[0, 4, 4], target[0, 1, 1] = 12.0, 3.0
    # the network learns the root of |V_g| / |V_0|; its outputs map back, negatives to 0
    np.testing.assert_allclose(normalize_target(target)[0, [4, 1], [4, 1]], [1.0, 0.5])
    assert not normalize_target(torch.from_numpy(target))[1].any()
    np.testing.assert_allclose(
        structure_factor_image(normalize_target(torch.from_numpy(target))).numpy(), target / 12
    )
    np.testing.assert_array_equal(structure_factor_image(np.array([-0.3, 0.5])), [0.0, 0.25])


def test_datamodule_joins_folders_of_one_detector(dataset, tmp_path):
    # a second run over the same structures: they must stay in one split across folders
    tasks = [
        SimpleNamespace(index=i, seed=50 + i, n_samples=PER_STRUCTURE) for i in range(N_STRUCTURES)
    ]
    build = dict(seed=1, samples_per_shard=8, n_workers=1, progress=False)
    second = build_dataset(
        tmp_path / "second", tasks, _simulate, config={"synthetic": True}, **build
    )
    dm = FCUNetDataModule([str(dataset), second], splits=(0.5, 0.25, 0.25), augment={}, seed=3)
    dm.setup()
    single = FCUNetDataModule(dataset, augment={})
    single.setup()
    n = len(single.datasets["train"].shards)
    assert sum(len(ds) for ds in dm.datasets.values()) == 2 * n
    ids = np.concatenate([dm.stores[0].column("structure_id"), dm.stores[1].column("structure_id")])
    splits = [{ids[i] for i in ds.items} for ds in dm.datasets.values()]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    # indices run on into the second folder (augmentation draws are keyed on them)
    indices = [dm.datasets["train"][i]["index"] for i in range(len(dm.datasets["train"]))]
    assert len(set(indices)) == len(indices) and max(indices) >= n
    item = dm.datasets["train"].items[-1]
    raw = dm.datasets["train"].shards[item]
    np.testing.assert_array_equal(
        raw["cbed"], ShardDataset(second)[item - n]["cbed"]
    )  # the item is the second folder's sample

    other = build_dataset(
        tmp_path / "other",
        tasks[:2],
        _simulate,
        config={"synthetic": True, "detector": {"n_pixels": 64}},
        **build,
    )
    with pytest.raises(ConfigurationError, match="different detectors"):
        FCUNetDataModule([dataset, other])


def test_datamodule_splits_by_structure_and_augments_per_epoch(dataset):
    dm = FCUNetDataModule(dataset, splits=(0.5, 0.25, 0.25), batch_size=4, augment={}, seed=3)
    dm.setup("fit")
    assert dm.pattern_shape == (N_PIXELS, N_PIXELS)
    sizes = {name: len(ds) for name, ds in dm.datasets.items()}
    assert sizes == {"train": 16, "val": 8, "test": 8}
    structures = {
        name: {dm.stores[0].column("structure_id")[i] for i in ds.items}
        for name, ds in dm.datasets.items()
    }
    assert not (structures["train"] & structures["val"] or structures["train"] & structures["test"])

    train = dm.datasets["train"]
    item = train[(1, 5)]
    assert set(item) == {"pattern", "probe", "target", "index"}
    assert item["pattern"].shape == item["target"].shape == (1, N_PIXELS, N_PIXELS)
    assert item["target"].max() == 1.0  # normalised: the central beam is 1
    again = FCUNetDataModule(dataset, splits=(0.5, 0.25, 0.25), augment={}, seed=3)
    again.setup()
    assert torch.equal(
        again.datasets["train"][(1, 5)]["pattern"], item["pattern"]
    )  # seed + epoch + index
    assert not torch.equal(train[(2, 5)]["pattern"], item["pattern"])  # a new epoch, new noise
    val = dm.datasets["val"]
    assert torch.equal(val[3]["pattern"], val[3]["pattern"])  # validation: fixed draws

    loader = dm.train_dataloader()
    loader.sampler.set_epoch(4)
    order = [i for batch in loader for i in batch["index"].tolist()]
    loader.sampler.set_epoch(4)
    assert order == [i for batch in loader for i in batch["index"].tolist()]
    assert sorted(order) == sorted(train.items) and len(loader) == 4
    loader.sampler.set_epoch(5)
    assert order != [i for batch in loader for i in batch["index"].tolist()]

    clean = FCUNetDataModule(dataset, splits=(0.5, 0.5), augment=None)
    with pytest.raises(ConfigurationError, match="no test split"):
        clean.test_dataloader()
    with pytest.raises(MissingFileError):
        FCUNetDataModule(dataset.parent / "nowhere")


# ---- peak metric -----------------------------------------------------------------------------
def _peak_image(positions, heights):
    x, y = np.meshgrid(np.arange(24.0), np.arange(24.0), indexing="ij")
    return torch.from_numpy(
        _gaussians(x, y, np.asarray(positions, float), np.asarray(heights, float))
    )[None, None]


def test_find_and_match_peaks():
    image = _peak_image([[12, 12], [6.3, 17.8], [18, 5]], [1.0, 0.4, 0.04])
    found = find_peaks(image, threshold=0.05)[0]
    assert len(found) == 2  # the 4% peak is below the threshold
    np.testing.assert_allclose(
        found[np.argsort(found[:, 0])][:, :2], [[6.3, 17.8], [12, 12]], atol=1e-3
    )
    tp, fp, fn, d = match_peaks(
        np.array([[0.0, 0.0], [5.0, 5.2], [9.0, 9.0]]), np.array([[5.0, 5.0], [20.0, 1.0]]), 1.5
    )
    assert (tp, fp, fn) == (1, 2, 1) and np.allclose(d, [0.2])

    true = _peak_image([[12, 12], [6, 6], [6, 18], [18, 6]], [1.0, 0.5, 0.3, 0.2])
    predicted = _peak_image(
        [[12.4, 12], [6, 6.5], [6, 18], [3, 20]], [0.9, 0.5, 0.3, 0.3]
    )  # one moved, one wrong
    # the metric takes the network's scale, the root of |V_g| / |V_0| (normalize_target)
    true, predicted = true.sqrt(), predicted.sqrt()
    metric = PeakAccuracy(threshold=0.05, tolerance=1.5)
    metric.update(true, true)
    assert metric.compute()["accuracy"] == 1 and metric.compute()["position_error"] < 1e-4
    metric.reset()
    metric.update(predicted, true)  # the central beam is not scored, wherever it is predicted
    scores = metric.compute()
    assert scores["accuracy"] == pytest.approx(2 / 4)  # TP 2, FP 1, FN 1
    assert scores["position_error"] == pytest.approx(0.25, abs=1e-3)


# ---- configs ---------------------------------------------------------------------------------
def _resolved(cfg, output_dir: Path) -> dict:
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    job = {
        key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        for key, value in cfg.items()
        if key != "hydra"
    }
    job["launcher"] = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    job["run_dir"] = cfg.hydra.run.dir
    return job


@pytest.mark.filterwarnings("ignore:\\s*'hydra/launcher/.*ConfigStore schema:UserWarning")
def test_every_experiment_and_group_option_composes(dataset, tmp_path):
    groups = {
        folder: sorted(p.stem for p in (Path(config_dir()) / folder).glob("*.yaml"))
        for folder in (
            "experiment",
            "trainer",
            "logger",
            "model",
            "data",
            "callbacks",
            "hydra/launcher",
        )
    }
    assert groups["experiment"] == sorted(
        [*(e for e in EXPERIMENTS if e), *CRYSTAL_ID["experiment"]]
    )
    assert groups["trainer"] == sorted(["default", *TRAINERS])
    assert groups["logger"] == sorted(LOGGERS)
    assert groups["model"] == sorted([*MODELS, *CRYSTAL_ID["model"]])
    assert groups["hydra/launcher"] == sorted(e for e in LAUNCHERS if e)
    with initialize_config_dir(config_dir(), version_base="1.3", job_name="train"):
        for i, (experiment, trainer) in enumerate((e, t) for e in EXPERIMENTS for t in TRAINERS):
            launcher, logger = LAUNCHERS[i % 3], LOGGERS[i % 2]
            overrides = [f"trainer={trainer}", f"logger={logger}", f"data.path={dataset}"]
            overrides += [f"experiment={experiment}"] * bool(experiment) + [
                f"hydra/launcher={launcher}"
            ] * bool(launcher)
            job = _resolved(
                compose("train", overrides=overrides, return_hydra_config=True), tmp_path
            )
            assert job["name"] == (experiment or "fcunet_small")
            assert job["run_dir"].startswith(f"outputs/train/{job['name']}/")
            assert job["trainer"]["default_root_dir"] == str(tmp_path)
            assert set(job["logger"]) == {logger} and set(job["callbacks"]) >= {
                "model_checkpoint",
                "last_checkpoint",
            }
            assert get_class(job["launcher"]["_target_"])  # the plugin is installed
            if launcher == "submitit_slurm":  # one SLURM task per GPU for Lightning's DDP
                assert (
                    job["launcher"]["tasks_per_node"]
                    == job["launcher"]["gpus_per_node"]
                    == job["trainer"]["devices"]
                )
            if trainer.startswith("ddp"):
                assert job["trainer"]["strategy"] == trainer and job["trainer"]["devices"] == 2
            if trainer == "cpu":
                instantiate(job["trainer"], logger=False)
            for name in ("callbacks", "logger"):  # builds, starts nothing
                assert all(instantiate(spec) for spec in job[name].values())
        for model, cls in MODELS.items():
            job = _resolved(
                compose(
                    "train",
                    overrides=[f"model={model}", f"data.path={dataset}"],
                    return_hydra_config=True,
                ),
                tmp_path,
            )
            module = FCUNetModule(model=job["model"], **job["module"])
            assert type(module.net) is cls and module.net.config() == {
                k: v for k, v in job["model"].items() if k != "_target_"
            }
        job = _resolved(
            compose("train", overrides=[f"data.path={dataset}"], return_hydra_config=True), tmp_path
        )
        assert isinstance(instantiate(job["data"]), FCUNetDataModule)


def test_cli_prints_the_config_and_refuses_bad_ones(dataset, tmp_path):
    result = CliRunner().invoke(
        train_command, ["--cfg", "experiment=unet_small", "data.batch_size=3"]
    )
    assert result.exit_code == 0, result.output
    shown = OmegaConf.create(result.output)
    assert shown.model._target_ == "stemforge.models.unet.UNet" and shown.data.batch_size == 3
    with pytest.raises(ConfigurationError, match="no training data given.*data.path=DIR"):
        CliRunner().invoke(train_command, ["experiment=fcunet_small"], catch_exceptions=False)
    with pytest.raises(MissingFileError, match="does not exist"):
        CliRunner().invoke(
            train_command, [f"data.path={tmp_path / 'nowhere'}"], catch_exceptions=False
        )
    with pytest.raises(ConfigurationError, match=r"bad training override.*\+trainer.nonsense"):
        compose_config(["trainer.nonsense=1"])
    with pytest.raises(ConfigurationError, match="there is no .*last.ckpt.*hydra.run.dir"):
        main([f"data.path={dataset}", "ckpt_path=last", f"hydra.run.dir={tmp_path / 'fresh'}"])
    with pytest.raises(ConfigurationError, match="trainer=ddp_spawn for -m sweeps"):
        main(
            [
                "-m",
                f"data.path={dataset}",
                "trainer=ddp",
                "trainer.accelerator=cpu",
                f"hydra.sweep.dir={tmp_path / 'sweep'}",
            ]
        )


# ---- training runs ---------------------------------------------------------------------------
@pytest.mark.parametrize("experiment", ["fcunet_small", "unet_small"])
def test_fast_dev_run(dataset, tmp_path, experiment):
    run = _run(dataset, tmp_path / experiment, "trainer.fast_dev_run=true", experiment=experiment)
    meta = json.loads((run / "model" / "model.json").read_text())
    assert meta["model"] == experiment.split("_")[0] and meta["name"] == experiment


def test_a_run_starts_from_exported_weights(dataset, tmp_path):
    source = _run(dataset, tmp_path / "source", "trainer.fast_dev_run=true") / "model"
    weights = source / "model.safetensors"
    # learning rate 0: the fine-tuned export must hold the source's weights exactly
    tuned = _run(
        dataset,
        tmp_path / "tuned",
        f"init_weights={weights}",
        "trainer.max_epochs=1",
        "module.optimizer.lr=0",
        "module.scheduler.name=constant",
    )
    before, after = load_file(weights), load_file(tuned / "model" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    meta = json.loads((tuned / "model" / "model.json").read_text())
    assert meta["init_weights"] == str(weights)
    fresh = _run(dataset, tmp_path / "fresh", "trainer.max_epochs=1", "module.optimizer.lr=0")
    fresh_weights = load_file(fresh / "model" / "model.safetensors")
    # without init_weights the same seed starts elsewhere: the equality above is the loading
    assert not all(torch.equal(before[k], fresh_weights[k]) for k in before)

    with pytest.raises(ConfigurationError, match="init_weights=.*FCUNet"):
        load_initial_weights(FCUNet(depth=2, width=8, max_width=8, refine_width=4), str(weights))


def test_training_lowers_val_loss_logs_csv_and_exports_the_best_weights(dataset, tmp_path):
    run = _run(
        dataset,
        tmp_path / "run",
        "trainer.max_epochs=3",
        "data.batch_size=4",
        "module.optimizer.lr=3e-3",
        "module.scheduler.name=constant",
    )
    rows = _metrics(run)
    val = [float(r["val/loss"]) for r in rows if r["val/loss"]][:3]  # the fit's three epochs
    assert len(val) == 3 and val[-1] < val[0], val
    assert sum(bool(r["train/loss"]) for r in rows) == 12  # 4 steps x 3 epochs
    assert any(r.get("lr-AdamW") for r in rows) and any(r.get("test/accuracy") for r in rows)

    weights, meta = (
        run / "model" / "model.safetensors",
        json.loads((run / "model" / "model.json").read_text()),
    )
    assert meta["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert meta["checkpoint"].startswith("best-epoch") and meta["normalization"] == NORMALIZATION
    assert (
        meta["seed"] == 0
        and meta["data"]["path"] == str(dataset)
        and meta["data"]["datasets"][0]["shape"] == [32, 32]
    )
    # the structures it saw, so that benchmarks can hold them out without the data
    ids = {str(i) for i in open_dataset(dataset).column("structure_id")}
    assert meta["data"]["datasets"][0]["structure_ids"] == sorted(ids) and len(ids) > 1
    assert meta["metrics"]["val/loss"] == pytest.approx(
        min(val), rel=1e-6
    )  # the exported weights are the best
    assert meta["command"].startswith("stemforge train experiment=fcunet_small")
    with safe_open(str(weights), framework="pt") as f:
        header = f.metadata()
    assert header["model"] == "fcunet" and json.loads(header["config"]) == meta["config"]
    assert json.loads(header["normalization"]) == NORMALIZATION and json.loads(header["seed"]) == 0

    model = FCUNet(**meta["config"])
    model.load_state_dict(load_file(weights))
    best = FCUNetModule.load_from_checkpoint(run / "checkpoints" / meta["checkpoint"]).net
    pattern, probe = torch.rand(2, 1, 32, 32), torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(pattern, probe), best.eval()(pattern, probe))


def test_resumed_run_ends_bit_identical_to_an_uninterrupted_one(dataset, tmp_path):
    same = ["trainer.max_epochs=2", "model.dropout=0.2", "test=false", "export=false"]
    straight = _run(dataset, tmp_path / "straight", *same)
    # the same run stopped after its first epoch (as if killed), then resumed
    stop = [
        "+callbacks.stop._target_=pytorch_lightning.callbacks.EarlyStopping",
        "+callbacks.stop.monitor=val/loss",
        "+callbacks.stop.stopping_threshold=1e9",
    ]
    parts = _run(dataset, tmp_path / "parts", *same, *stop)
    assert torch.load(parts / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    _run(dataset, tmp_path / "parts", *same, "ckpt_path=last")
    a, b = (
        torch.load(r / "checkpoints" / "last.ckpt", weights_only=True) for r in (straight, parts)
    )
    assert a["global_step"] == b["global_step"] == 4 and a["epoch"] == b["epoch"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    moments = zip(
        a["optimizer_states"][0]["state"].values(),
        b["optimizer_states"][0]["state"].values(),
        strict=True,
    )
    assert all(torch.equal(x["exp_avg_sq"], y["exp_avg_sq"]) for x, y in moments)
    assert a["lr_schedulers"] == b["lr_schedulers"]


def test_wandb_logs_offline_without_network(dataset, tmp_path, monkeypatch, local_server):
    server = local_server(lambda path, headers: (500, {"error": "this test is offline"}))
    monkeypatch.setenv(
        "WANDB_BASE_URL", server.url.rstrip("/")
    )  # anything W&B sent would land here
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline comes from the config
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    run = _run(
        dataset,
        tmp_path / "run",
        "logger=wandb",
        "trainer.max_epochs=1",
        "test=false",
        "module.log_images_every_n_epochs=1",
    )
    (offline,) = run.glob("wandb/offline-run-*")
    assert list(offline.glob("run-*.wandb"))
    assert (
        len(list(offline.glob("files/media/images/val/examples_*.png"))) == 4
    )  # input|target|prediction
    assert server.requests == []


def test_joblib_multirun_runs_two_jobs(dataset, tmp_path):
    sweep = tmp_path / "sweep"
    main(
        [
            "-m",
            "hydra/launcher=joblib",
            "experiment=unet_small",
            *TINY["unet_small"],
            f"data.path={dataset}",
            "data.splits=[0.5,0.25,0.25]",
            "data.num_workers=0",
            "data.batch_size=4,8",
            "logger=csv",
            "trainer.fast_dev_run=true",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    for job, batch in (("0", 4), ("1", 8)):
        assert OmegaConf.load(sweep / job / ".hydra" / "config.yaml").data.batch_size == batch
        assert (sweep / job / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_ddp_spawn_trains_on_two_cpu_processes(dataset, tmp_path):
    run = _run(
        dataset,
        tmp_path / "ddp",
        "trainer=ddp_spawn",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_epochs=1",
        experiment="unet_small",
    )
    rows = _metrics(run)
    assert [r["step"] for r in rows if r["train/loss"]] == ["0"]  # 16 samples / 2 ranks / batch 8
    assert json.loads((run / "model" / "model.json").read_text())["metrics"]["test/loss"] > 0
