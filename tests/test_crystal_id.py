"""Crystal identification: labels, peak-list data, the hierarchical model, aggregation, files."""

import fractions
import json
import sys

import cloudpickle
import numpy as np
import pytest
from built_peak_lists import built_peak_lists

from stemforge.core.errors import ConfigurationError, InvalidDataError
from stemforge.datasets.peak_lists import (
    PeakLists,
    augment,
    kinematic_peak_lists,
    one_per_zone_axis,
    read_peak_lists,
    split_by_structure,
    write_peak_lists,
)
from stemforge.models.crystal_id import (
    CrystalIdentifier,
    PatternPredictions,
    aggregate,
    complete_lattice,
)
from stemforge.simulate.labels import lattice_parameters
from stemforge.simulate.structures import get_structure

# Three crystal systems: cubic Cu, hexagonal Mg, tetragonal rutile TiO2.
PROTOTYPES = (
    "aflow-proto:A_cF4_225_a-Cu",
    "aflow-proto:A_hP2_194_c-Mg",
    "aflow-proto:A2B_tP6_136_f_a-TiO2",
)


@pytest.fixture(scope="module")
def lists():
    records = [get_structure(i) for i in PROTOTYPES]
    return kinematic_peak_lists(records, seed=0, n_zone_axes=4, thickness=(50.0, 150.0))


def test_lattice_conventions():
    from pymatgen.core import Lattice, Structure

    ortho = Structure(Lattice.orthorhombic(6.0, 4.0, 5.0), ["Si"], [[0, 0, 0]])
    np.testing.assert_allclose(
        lattice_parameters(ortho.lattice, "orthorhombic"), [4, 5, 6, 90, 90, 90]
    )
    mono = Structure(Lattice.monoclinic(4.0, 5.0, 6.0, 80.0), ["Si"], [[0, 0, 0]])
    assert lattice_parameters(mono.lattice, "monoclinic")[4] == pytest.approx(100.0)
    hexagonal = complete_lattice("hexagonal", np.array([[3.2, 5.2]]))[0]
    np.testing.assert_allclose(hexagonal, [3.2, 3.2, 5.2, 90, 90, 120])


def test_kinematic_lists_carry_labels_and_survive_a_file(lists, tmp_path):
    assert len(lists) == 3 * 4 * 2
    assert set(lists.space_group) == {225, 194, 136}
    assert list(np.unique(lists.crystal_system)) == [3, 5, 6]  # tetragonal, hexagonal, cubic
    cu = lists.structure_id == PROTOTYPES[0]
    np.testing.assert_allclose(lists.lattice[cu, :3], 3.61, atol=0.01)
    path = write_peak_lists(tmp_path / "lists.h5", lists, {"note": "test"})
    back, config = read_peak_lists(path)
    assert config == {"note": "test"}
    np.testing.assert_array_equal(back.q, lists.q)
    np.testing.assert_array_equal(back.structure_id, lists.structure_id)


def test_split_and_augment(lists):
    train, test = split_by_structure(lists.structure_id, [0.67, 0.33], seed=0)
    assert not set(lists.structure_id[train]) & set(lists.structure_id[test])
    assert (train | test).all()
    a, b = augment(lists, 3), augment(lists, 3)
    np.testing.assert_array_equal(a.q, b.q)
    # The calibration error stays within its bound: spot radii scale by at most 3 % (+ noise).
    one = lists.select([0])
    ratios = []
    for seed in range(20):
        moved = augment(
            one, seed, ellipticity=0, position_noise=0, intensity_noise=0, drop_below=(1e-9, 2e-9)
        )
        ratios.append(np.median(np.linalg.norm(moved.q, axis=1) / np.linalg.norm(one.q, axis=1)))
    assert 0.97 <= min(ratios) and max(ratios) <= 1.03 and max(ratios) - min(ratios) > 0.02
    # The detector's edge: a square of half-width 0.6-0.9 Å⁻¹; drawn after the other
    # errors, so an edge beyond every spot changes nothing.
    cut = augment(lists, 3, reach=(0.6, 0.9))
    assert np.abs(cut.q).max() <= 0.9 and len(cut.q) < len(a.q)
    np.testing.assert_array_equal(augment(lists, 3, reach=(9.0, 9.0)).q, a.q)


def test_one_pattern_per_zone_axis_of_each_structure(lists):
    rows = one_per_zone_axis(lists, seed=0)
    # 3 structures × 4 zone axes, each from one of its 2 thicknesses.
    assert len(rows) == 12 and np.all(np.diff(rows) > 0)
    picked = {(lists.structure_id[i], tuple(lists.zone_axis[i])) for i in rows}
    assert len(picked) == 12
    thicknesses = {
        seed: tuple(lists.thickness[one_per_zone_axis(lists, seed)]) for seed in range(4)
    }
    assert len(set(thicknesses.values())) > 1  # the thickness is drawn, not always the first


def _fit_small(lists) -> CrystalIdentifier:
    """Small forests on six augmented copies of the three prototypes' patterns."""
    model = CrystalIdentifier(
        system_params={"n_estimators": 20},
        group_params={"n_estimators": 10},
        lattice_params={"n_estimators": 10},
    )
    train = PeakLists.concatenate(augment(lists, seed) for seed in range(6))
    return model.fit(
        model.features(train.q, train.intensity, train.offsets), train.space_group, train.lattice
    )


def test_model_fits_saves_loads_and_aggregates(lists, tmp_path):
    model = _fit_small(lists)
    predictions = model.predict_peaks(lists.q, lists.intensity, lists.offsets)
    assert np.mean(predictions.crystal_system == lists.crystal_system) > 0.9
    np.testing.assert_allclose(predictions.system_probability.sum(axis=1), 1.0)
    np.testing.assert_allclose(predictions.group_probability.sum(axis=1), 1.0)
    path = model.save(tmp_path / "model.skops")
    again = CrystalIdentifier.load(path).predict_peaks(lists.q, lists.intensity, lists.offsets)
    np.testing.assert_array_equal(again.system_probability, predictions.system_probability)
    np.testing.assert_array_equal(again.lattice, predictions.lattice)
    cu = np.flatnonzero(lists.structure_id == PROTOTYPES[0])
    result = aggregate(predictions.take(cu))
    assert result.crystal_system == "cubic" and result.space_group == 225
    assert result.lattice[0] == pytest.approx(3.61, abs=0.05)
    assert 0.5 < result.confidence <= 1.0
    json.dumps(result.to_dict())


def test_stages_take_their_own_estimators(lists, tmp_path):
    """Boosted trees for the crystal system, forests for the rest: fitted, saved, loaded."""
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestRegressor

    model = CrystalIdentifier(
        estimator={"system": "hist_gradient_boosting"},
        system_params={"max_iter": 30},
        group_params={"n_estimators": 5},
        lattice_params={"n_estimators": 5},
    )
    assert model.estimators == {
        "system": "hist_gradient_boosting",
        "group": "random_forest",
        "lattice": "random_forest",
    }
    assert model.architecture == "crystal_id_hist_gradient_boosting+random_forest"
    train = PeakLists.concatenate(augment(lists, seed) for seed in range(3))
    model.fit(
        model.features(train.q, train.intensity, train.offsets), train.space_group, train.lattice
    )
    assert isinstance(model.system_model, HistGradientBoostingClassifier)
    assert all(isinstance(m, RandomForestRegressor) for m in model.lattice_models.values())
    predictions = model.predict_peaks(lists.q, lists.intensity, lists.offsets)
    assert np.mean(predictions.crystal_system == lists.crystal_system) > 0.9
    again = CrystalIdentifier.load(model.save(tmp_path / "model.skops"))
    assert again.estimators == model.estimators
    np.testing.assert_array_equal(
        again.predict_peaks(lists.q, lists.intensity, lists.offsets).system_probability,
        predictions.system_probability,
    )
    with pytest.raises(ConfigurationError, match="stage"):
        CrystalIdentifier(estimator={"space_group": "random_forest"})
    with pytest.raises(ConfigurationError, match="unknown estimator"):
        CrystalIdentifier(estimator={"system": "svm"})


def test_aggregate_sums_log_probabilities():
    # Two weak votes for cubic outweigh one strong vote for hexagonal... (log-sum, not majority).
    p = np.full((3, 7), 0.01)
    p[0, 6], p[1, 6], p[2, 5] = 0.5, 0.5, 0.94
    p /= p.sum(axis=1, keepdims=True)
    groups = np.zeros((3, 230))
    groups[:, 224], groups[:, 193] = p[:, 6], p[:, 5]
    result = aggregate(PatternPredictions(p, groups, np.zeros((3, 7, 6))))
    assert result.crystal_system == "cubic" and result.space_group == 225
    assert result.margin == pytest.approx(2 * np.log(0.5 / 0.01) + np.log(0.01 / 0.94), rel=1e-3)


def test_loading_refuses_foreign_types(tmp_path):
    import skops.io as sio

    path = tmp_path / "evil.skops"
    sio.dump({"settings": "{}", "system": fractions.Fraction(1, 3)}, path)
    with pytest.raises(InvalidDataError, match="not scikit-learn"):
        CrystalIdentifier.load(path)
    with pytest.raises(InvalidDataError, match="no crystal-identification model"):
        CrystalIdentifier.load(tmp_path / "missing.skops")


@pytest.fixture(scope="module")
def trained(lists, tmp_path_factory):
    return _fit_small(lists).save(tmp_path_factory.mktemp("model") / "model.skops")


def _peak_file(lists, rows, path, pixel=0.02, origin=63.5):
    """A 2×N scan of the patterns at ``rows`` as a detector-pixel peak table with direct beams."""
    from stemforge.core.braggpeaks import BraggPeaks
    from stemforge.core.calibration import Calibration
    from stemforge.datasets.io import write_braggpeaks

    columns = [[], [], [], [], []]
    for i, row in enumerate(rows):
        q = lists.q[lists.offsets[row] : lists.offsets[row + 1]]
        intensity = lists.intensity[lists.offsets[row] : lists.offsets[row + 1]]
        spots = np.vstack([[0, 0], q / pixel]) + origin
        values = np.concatenate([[10 * intensity.max()], intensity])
        inside = np.all((spots >= 0) & (spots < 128), axis=1)
        for column, value in zip(
            columns, (i // 2, i % 2, *spots[inside].T, values[inside]), strict=True
        ):
            column.append(np.broadcast_to(value, inside.sum()))
    peaks = BraggPeaks.from_columns(
        *(np.concatenate(c) for c in columns), ((len(rows) + 1) // 2, 2), (128, 128)
    )
    calibration = Calibration(q_pixel_size=pixel, q_units="A^-1", qx0=origin, qy0=origin)
    return write_braggpeaks(peaks, path, calibration=calibration)


def test_identify_command_on_a_peak_table(lists, trained, tmp_path):
    from click.testing import CliRunner

    from stemforge.infer.identify_commands import identify

    rows = np.flatnonzero(lists.structure_id == PROTOTYPES[0])[:6]
    peaks = _peak_file(lists, rows, tmp_path / "cu.h5")
    out = tmp_path / "result.json"
    run = CliRunner().invoke(
        identify, [str(peaks), "--identifier", str(trained), "--out", str(out)]
    )
    assert run.exit_code == 0, run.output
    document = json.loads(out.read_text())
    assert document["aggregate"]["crystal_system"] == "cubic"
    assert document["aggregate"]["space_group"] == 225
    assert document["aggregate"]["lattice"]["a"] == pytest.approx(3.61, abs=0.1)
    assert len(document["patterns"]) == 6
    first = document["patterns"][0]
    assert {"rx", "ry", "crystal_system", "space_group", "probabilities"} <= set(first)
    assert sum(first["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    assert (tmp_path / "result.png").stat().st_size > 1000
    # HDF5 output, an ROI, and a clear error without a Q calibration.
    h5 = tmp_path / "result.h5"
    run = CliRunner().invoke(
        identify, [str(peaks), "--identifier", str(trained), "--roi", "0:1,0:2", "--out", str(h5)]
    )
    assert run.exit_code == 0, run.output
    import h5py

    with h5py.File(h5) as f:
        assert f["crystal_system"].shape == (3, 2) and f["system_probability"].shape == (3, 2, 7)
        assert json.loads(f.attrs["aggregate"])["n_patterns"] == 2


def test_identify_command_on_a_simulated_stack(trained, tmp_path):
    """abTEM multislice of Cu along three zone axes → disks detected → identified as cubic."""
    from click.testing import CliRunner

    from stemforge.infer.identify_commands import identify
    from stemforge.simulate.pattern import simulate_patterns

    cu = get_structure(PROTOTYPES[0])
    samples = [
        simulate_patterns(
            cu,
            axis,
            thicknesses=[100.0],
            semiangle=1.5,
            n_pixels=96,
            q_pixel_size=0.025,
            engine="fast",
        )[0]
        for axis in ((0, 0, 1), (0, 1, 1), (1, 1, 1))
    ]
    np.save(tmp_path / "stack.npy", np.stack([s.cbed for s in samples]))
    np.save(tmp_path / "probe.npy", samples[0].probe)
    out = tmp_path / "cu.json"
    args = [
        str(tmp_path / "stack.npy"),
        "--probe",
        str(tmp_path / "probe.npy"),
        "--q-pixel-size",
        "0.025",
    ]
    run = CliRunner().invoke(identify, [*args, "--identifier", str(trained), "--out", str(out)])
    assert run.exit_code == 0, run.output
    document = json.loads(out.read_text())
    assert document["aggregate"]["crystal_system"] == "cubic"
    assert document["aggregate"]["n_patterns"] == 3
    assert document["aggregate"]["lattice"]["a"] == pytest.approx(3.61, abs=0.15)


def test_shipped_identifier_loads_offline_and_knows_a_training_structure(lists):
    """crystal_id@0.3.0 ships in the package (sha256 checked) and recognises copper, one of
    the prototypes it was trained on, from four zone axes."""
    from stemforge.infer.identify import load_identifier
    from stemforge.models.peak_features import PeakFeatures

    model = load_identifier()
    assert model.features == PeakFeatures()
    assert model.metadata["name"] == "crystal_id_rf"
    cu = np.flatnonzero(lists.structure_id == PROTOTYPES[0])
    picked = lists.select(cu)
    result = aggregate(model.predict_peaks(picked.q, picked.intensity, picked.offsets))
    assert result.crystal_system == "cubic"


def test_experiment_trains_scores_and_exports(lists, tmp_path):
    """``stemforge train experiment=crystal_id_rf``: Hydra run → scores → zoo-ready skops."""
    from stemforge.models.zoo.cache import file_sha256
    from stemforge.train.run import compose_config, main

    cfg = compose_config(["experiment=crystal_id_rf"])
    assert cfg.task == "crystal_id" and cfg.model.estimator.system == "hist_gradient_boosting"
    path = built_peak_lists(cfg, lists, tmp_path)
    run = tmp_path / "run"
    main(
        [
            "experiment=crystal_id_rf",
            f"data.path={path}",
            "data.splits=[0.34,0.33,0.33]",
            "data.augment.copies=3",
            "model.system_params.max_iter=10",
            "model.group_params.n_estimators=5",
            "model.lattice_params.n_estimators=5",
            f"hydra.run.dir={run}",
        ]
    )
    description = json.loads((run / "model" / "model.json").read_text())
    weights = run / "model" / description["file"]
    assert description["sha256"] == file_sha256(weights)
    metrics = description["metadata"]["metrics"]
    for key in ("val/system_accuracy", "val/group_top3", "test/aggregate_system_accuracy"):
        assert 0 <= metrics[key] <= 1
    # One structure per split, scored on one pattern per zone axis: four patterns.
    assert metrics["test/system_accuracy"] * 4 == pytest.approx(
        round(metrics["test/system_accuracy"] * 4)
    )
    assert next(run.glob("csv/version_*/metrics.csv")).read_text().count("val/system_accuracy")
    model = CrystalIdentifier.load(weights)
    assert model.metadata["n_train_patterns"] == 3 * 8  # one structure, 3 augmented copies
    predictions = model.predict_peaks(lists.q, lists.intensity, lists.offsets)
    assert predictions.system_probability.shape == (len(lists), 7)


CU_AXES = ((0, 0, 1), (0, 1, 1), (1, 1, 1))
# The factory's workers get the simulate function by value (this module is not importable).
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _simulate_cu(task):
    from stemforge.simulate.pattern import simulate_patterns

    cu = get_structure(PROTOTYPES[0])
    return simulate_patterns(
        cu,
        CU_AXES[task.index],
        thicknesses=[100.0],
        semiangle=1.5,
        n_pixels=96,
        q_pixel_size=0.025,
        engine="fast",
    )


def test_peak_lists_of_multislice_shards_exact_and_detected(tmp_path):
    """Factory shards → spot lists: exact tables and correlation-detected disks agree; a
    dataset folder among the training's extra sources brings both."""
    from types import SimpleNamespace

    from stemforge.datasets.build import build_dataset
    from stemforge.train.crystal_id import extra_peak_lists

    tasks = [SimpleNamespace(index=i, seed=i, n_samples=1) for i in range(len(CU_AXES))]
    folder = build_dataset(
        tmp_path / "cu",
        tasks,
        _simulate_cu,
        config={"cu": True},
        seed=0,
        samples_per_shard=2,
        n_workers=1,
        progress=False,
    )
    exact, detected = extra_peak_lists(folder)
    assert len(exact) == len(detected) == 3
    assert set(exact.space_group) == {225} and list(detected.source) == ["correlation"] * 3
    np.testing.assert_allclose(exact.lattice[:, 0], 3.61, atol=0.01)
    # Cu [001]: the strongest diffracted disks are the four {200} at |g| = 2/a.
    first = exact.select([0])
    strongest = np.argsort(-first.intensity)[:4]
    np.testing.assert_allclose(np.linalg.norm(first.q[strongest], axis=1), 2 / 3.615, rtol=0.01)
    # Every strong detected disk lies on an exact reflection's disk: within half the disk
    # radius (1.5 mrad = 3.0 px, so 1.5 px = 0.0375 Å⁻¹). Not closer: at 100 Å the Ewald
    # sphere leaves an intensity slope across each disk that pulls the correlation peak
    # towards the sphere (0.9 px on Cu [001] {200}), which is why models also train on
    # detected peaks.
    for i in range(3):
        ours, truth = detected.select([i]), exact.select([i])
        strong = ours.q[np.argsort(-ours.intensity)[:4]]
        distance = np.linalg.norm(strong[:, None] - truth.q[None], axis=-1).min(axis=1)
        assert distance.max() < 0.0375
    # A peak-list file among the extra sources is read as it is.
    path = write_peak_lists(tmp_path / "detected.h5", detected, {"note": "test"})
    (again,) = extra_peak_lists(path)
    np.testing.assert_array_equal(again.q, detected.q)
