"""Augmentation kernels: the numbers they promise (counts, fractions, positions, shapes)."""

import math

import numpy as np
import pytest

from stemforge.core.errors import ConfigurationError, InvalidDataError, ShapeError, StemforgeError
from stemforge.infer.disks import DetectionParams, find_peaks, refine_gaussian
from stemforge.infer.ellipse import ellipse_correction
from stemforge.simulate.augment import (
    Augmenter,
    add_background,
    affine_distort,
    affine_matrix,
    detector_blur,
    detector_defects,
    plasmon_background,
    poisson_dose,
)
from stemforge.simulate.labels import render_target
from stemforge.simulate.sample import PEAK_DTYPE, Sample


def disk(shape, center, radius, sub=8):
    """Uniform disk, each pixel holding the fraction of its area inside (sub × sub samples)."""
    offsets = (np.arange(sub) + 0.5) / sub - 0.5
    x = (np.arange(shape[0])[:, None] + offsets[None, :]).ravel()[:, None] - center[0]
    y = (np.arange(shape[1])[:, None] + offsets[None, :]).ravel()[None, :] - center[1]
    inside = (x**2 + y**2 <= radius**2).astype(float)
    return inside.reshape(shape[0], sub, shape[1], sub).mean(axis=(1, 3))


def centroid(image, center, radius):
    """Intensity centroid inside a circular window around ``center``."""
    x = np.arange(image.shape[0])[:, None]
    y = np.arange(image.shape[1])[None, :]
    w = image * (np.hypot(x - center[0], y - center[1]) <= radius)
    return np.array([(w * x).sum(), (w * y).sum()]) / w.sum()


def moments(image):
    """Centroid and covariance matrix of an image."""
    x = np.arange(image.shape[0])[:, None]
    y = np.arange(image.shape[1])[None, :]
    total = image.sum()
    mx, my = (image * x).sum() / total, (image * y).sum() / total
    dx, dy = x - mx, y - my
    cov = np.array(
        [[(image * dx * dx).sum(), (image * dx * dy).sum()], [(image * dx * dy).sum(), (image * dy * dy).sum()]]
    )
    return np.array([mx, my]), cov / total


# ---- dose ---------------------------------------------------------------------------------
def test_dose_mean_is_dose_times_sum_and_variance_equals_mean():
    rng = np.random.default_rng(0)
    q = 24
    pattern = 0.5 * disk((q, q), (12, 12), 5) / disk((q, q), (12, 12), 5).sum() + 0.3 / q**2  # sum 0.8
    dose = 4e4
    counts = poisson_dose(np.broadcast_to(pattern, (600, q, q)), dose, rng)
    assert counts.shape == (600, q, q) and np.all(counts == np.round(counts))
    totals = counts.sum(axis=(1, 2))
    assert totals.mean() == pytest.approx(dose * pattern.sum(), rel=2e-3)
    mean, var = counts.mean(axis=0), counts.var(axis=0, ddof=1)
    np.testing.assert_allclose(mean, dose * pattern, rtol=0.15)
    assert (var / mean).mean() == pytest.approx(1.0, abs=0.01)
    # One dose per pattern; float32 in, float32 out.
    doses = np.array([1e3, 1e6])
    two = poisson_dose(np.stack([pattern, pattern]).astype(np.float32), doses, rng)
    assert two.dtype == np.float32
    np.testing.assert_allclose(two.sum(axis=(1, 2)) / (doses * pattern.sum()), 1.0, rtol=0.1)


def test_dose_rejects_counts_and_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(InvalidDataError, match="counts already"):
        poisson_dose(np.full((8, 8), 10.0), 1e4, rng)
    with pytest.raises(ConfigurationError, match="positive"):
        poisson_dose(np.zeros((8, 8)), -5, rng)
    with pytest.raises(ConfigurationError, match="default_rng"):
        poisson_dose(np.zeros((8, 8)), 1e4, 42)
    with pytest.raises(InvalidDataError, match="NaN"):
        poisson_dose(np.full((8, 8), np.nan), 1e4, rng)
    with pytest.raises(ShapeError, match=r"\(N, Qx, Qy\)"):
        poisson_dose(np.zeros((2, 2, 8, 8)), 1e4, rng)


# ---- plasmon background -------------------------------------------------------------------
def test_background_holds_the_requested_fraction_and_conserves_the_total():
    q = 65
    pattern = 0.9 * disk((q, q), (32, 32), 4) / disk((q, q), (32, 32), 4).sum()
    probe = disk((q, q), (32, 32), 4)
    bg = plasmon_background(probe, q_pixel_size=0.02, q0=0.1)
    assert bg.sum() == pytest.approx(1.0, rel=1e-12) and bg.min() >= 0
    for w in (0.05, 0.1, 0.3):
        out = add_background(pattern, bg, w)
        assert out.sum() == pytest.approx(pattern.sum(), rel=1e-12)
        added = out - (1 - w) * pattern
        assert added.sum() / out.sum() == pytest.approx(w, rel=1e-12)
    # Centred on the origin (odd grid: the detector is symmetric about it).
    c, _ = moments(bg)
    np.testing.assert_allclose(c, (32, 32), atol=1e-9)


def test_background_is_the_lorentzian_for_a_point_probe():
    q, dq, q0 = 65, 0.02, 0.1
    point = np.zeros((q, q))
    point[32, 32] = 1.0
    bg = plasmon_background(point, q_pixel_size=dq, q0=q0)
    lorentz = lambda r: 1 / ((r * dq) ** 2 + q0**2)  # noqa: E731
    for r in (5, 10, 30):
        assert bg[32 + r, 32] / bg[32, 32] == pytest.approx(lorentz(r) / lorentz(0), rel=1e-9)
    # A wider probe smooths the cusp at the origin.
    wide = plasmon_background(disk((q, q), (32, 32), 6), q_pixel_size=dq, q0=q0)
    assert wide[32, 32] < bg[32, 32]


def test_background_errors_name_the_fix():
    with pytest.raises(ConfigurationError, match="Q pixel size"):
        plasmon_background(np.ones((8, 8)), q_pixel_size=0.0)
    with pytest.raises(ConfigurationError, match="Å⁻¹"):
        plasmon_background(np.ones((8, 8)), q_pixel_size=0.02, q0=-1)
    with pytest.raises(ConfigurationError, match=r"\[0, 1\]"):
        add_background(np.ones((8, 8)), np.ones((8, 8)), 1.5)
    with pytest.raises(ShapeError, match="detector grid"):
        add_background(np.ones((8, 8)), np.ones((9, 9)), 0.1)


# ---- detector blur ------------------------------------------------------------------------
def test_gaussian_blur_has_the_requested_width_and_keeps_intensity():
    point = np.zeros((3, 64, 64))
    point[:, 32, 32] = 1.0
    sigmas = np.array([0.0, 1.0, 2.5])
    out = detector_blur(point, sigmas)
    np.testing.assert_allclose(out[0], point[0], atol=1e-12)
    for img, s in zip(out[1:], sigmas[1:], strict=True):
        c, cov = moments(img)
        assert img.sum() == pytest.approx(1.0, abs=1e-9)
        np.testing.assert_allclose(c, (32, 32), atol=1e-9)
        np.testing.assert_allclose(np.diag(cov), s**2, rtol=1e-3)


def test_lorentzian_blur_has_long_tails():
    point = np.zeros((128, 128))
    point[64, 64] = 1.0
    gamma = 2.0
    out = detector_blur(point, gamma, psf="lorentzian")
    psf = lambda r: (r**2 + gamma**2) ** -1.5  # noqa: E731
    for r in (3, 8, 20):
        assert out[64 + r, 64] / out[64, 64] == pytest.approx(psf(r) / psf(0), rel=0.03)
    with pytest.raises(ConfigurationError, match="gaussian"):
        detector_blur(point, 1.0, psf="airy")


# ---- defects ------------------------------------------------------------------------------
def test_defects_kill_and_heat_the_requested_fractions():
    rng = np.random.default_rng(1)
    patterns = np.full((4, 128, 128), 0.5)
    patterns[:, 0, 0] = 2.0  # the maximum
    out = detector_defects(patterns, rng, hot_fraction=0.01, dead_fraction=0.02, hot_level=3.0)
    assert np.mean(out == 0) == pytest.approx(0.02, rel=0.1)
    assert np.mean(out == 6.0) == pytest.approx(0.01, rel=0.15)
    assert not np.shares_memory(out, patterns) and patterns.min() == 0.5
    with pytest.raises(ConfigurationError, match="sum to at most 1"):
        detector_defects(patterns, rng, hot_fraction=0.7, dead_fraction=0.6)


# ---- affine -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ellipticity", "angle", "rotation", "shift"),
    [(1.0, 0.0, 0.0, (0.37, -0.61)), (1.15, 0.4, 0.0, (0.0, 0.0)), (1.12, -1.1, 0.7, (-0.83, 0.29))],
)
def test_affine_moves_a_disk_where_its_label_goes(ellipticity, angle, rotation, shift):
    q, pos = 96, (61.3, 27.8)
    image = disk((q, q), pos, 4.0)
    peaks = np.zeros(2, PEAK_DTYPE)
    peaks["qx"], peaks["qy"] = (pos[0], 48.0), (pos[1], 48.0)
    out, labels = affine_distort(
        image, ellipticity=ellipticity, ellipse_angle=angle, rotation=rotation, shift=shift, peaks=peaks
    )
    moved = np.array([labels.peaks["qx"][0], labels.peaks["qy"][0]])
    assert np.linalg.norm(centroid(out, moved, 7.0) - moved) < 0.05
    np.testing.assert_allclose(labels.origin, np.add((48, 48), shift), atol=1e-12)
    np.testing.assert_allclose([labels.peaks["qx"][1], labels.peaks["qy"][1]], labels.origin, atol=1e-5)
    assert out.sum() == pytest.approx(image.sum(), rel=1e-3)  # det M = 1
    assert labels.ellipse[0] / labels.ellipse[1] == pytest.approx(ellipticity)
    # Splatting a sparse peak image keeps each peak's intensity and puts it at its label.
    sparse = np.zeros((q, q))
    sparse[61, 27], sparse[48, 48] = 2.0, 1.0
    spots = np.array([[61.0, 27.0], [48.0, 48.0]])
    geometry = {"ellipticity": ellipticity, "ellipse_angle": angle, "rotation": rotation, "shift": shift}
    splat, moved_spots = affine_distort(sparse, **geometry, peaks=spots, resample="splat")
    assert splat.sum() == pytest.approx(3.0, rel=1e-12)
    for p, mass in zip(moved_spots.peaks, (2.0, 1.0), strict=True):
        window = np.hypot(*np.meshgrid(np.arange(q) - p[0], np.arange(q) - p[1], indexing="ij")) < 2
        assert (splat * window).sum() == pytest.approx(mass, rel=1e-12)
        np.testing.assert_allclose(centroid(splat, p, 2.0), p, atol=1e-9)


def test_affine_batch_uses_its_own_parameters_per_pattern():
    q = 80
    positions = [(30.2, 51.6), (55.5, 22.1), (40.0, 40.0)]
    images = np.stack([disk((q, q), p, 3.5) for p in positions]).astype(np.float32)
    peaks = [np.array([p]) for p in positions]
    r, phi, rot = np.array([1.0, 1.1, 1.15]), np.array([0.0, 0.8, -0.3]), np.array([0.2, 0.0, -0.5])
    shift = np.array([[0.5, 0.0], [-0.25, 0.75], [0.0, 0.0]])
    out, labels = affine_distort(images, ellipticity=r, ellipse_angle=phi, rotation=rot, shift=shift, peaks=peaks)
    assert out.dtype == np.float32 and out.shape == images.shape and labels.matrix.shape == (3, 2, 2)
    for img, p in zip(out, labels.peaks, strict=True):
        assert np.linalg.norm(centroid(img, p[0], 6.0) - p[0]) < 0.05
    with pytest.raises(ShapeError, match="one peak table per pattern"):
        affine_distort(images, peaks=peaks[:2])


def test_ellipse_ratio_and_angle_recovered_from_second_moments():
    q, r, phi, rot = 128, 1.15, 0.5, 0.9
    image = disk((q, q), (64, 64), 30.0)
    out, labels = affine_distort(image, ellipticity=r, ellipse_angle=phi, rotation=rot)
    _, cov = moments(out)
    lam, vec = np.linalg.eigh(cov)
    assert math.sqrt(lam[1] / lam[0]) == pytest.approx(r, rel=2e-3)
    measured = math.atan2(vec[1, 1], vec[0, 1])
    assert abs(math.remainder(measured - phi, math.pi)) < 5e-3
    a, b, theta = labels.ellipse
    assert (a * b, a / b, theta) == pytest.approx((1.0, r, phi))
    # Same convention as the calibration: infer's correction undoes it up to a scale √a/b.
    qx, qy = np.array([64.0 + 10, 64.0]), np.array([64.0, 64.0 - 7])
    m = affine_matrix(r, phi)
    dqx, dqy = m @ np.array([qx - 64, qy - 64])
    cx, cy = ellipse_correction(64 + dqx, 64 + dqy, (64, 64), a, b, theta)
    np.testing.assert_allclose(np.array([cx - 64, cy - 64]), math.sqrt(r) * np.array([qx - 64, qy - 64]), atol=1e-12)


def test_affine_rejects_impossible_distortions():
    with pytest.raises(ConfigurationError, match="a/b >= 1"):
        affine_distort(np.ones((8, 8)), ellipticity=0.9)
    with pytest.raises(ShapeError, match=r"\(dqx, dqy\)"):
        affine_distort(np.ones((8, 8)), shift=(1.0, 2.0, 3.0))
    with pytest.raises(ShapeError, match="qx"):
        affine_distort(np.ones((8, 8)), peaks=np.ones(3))


# ---- augmenter ----------------------------------------------------------------------------
def make_sample(q=64, dq=0.025):
    spots = [(32, 32), (32 + 14, 32), (32, 32 - 14), (32 - 14, 32 + 14)]
    cbed = sum(disk((q, q), s, 3.0) for s in spots)
    cbed = 0.9 * cbed / cbed.sum()
    heights = np.array([1.0, 0.4, 0.3, 0.2])
    # the FCU-Net target; a fifth reflection just off the detector reaches it with its tail
    off = np.array([[-1.2, 20.3]])
    target = render_target(np.concatenate([spots, off]), np.append(heights, 0.5), q)
    peaks = np.zeros(len(spots), PEAK_DTYPE)
    peaks["qx"], peaks["qy"] = np.array(spots, dtype=float).T
    peaks["intensity_kinematic"] = heights**2
    probe = disk((q, q), (32, 32), 3.0)
    meta = {"q_pixel_size": dq, "dose": None}
    return Sample(cbed.astype(np.float32), (probe / probe.sum()).astype(np.float32), target.astype(np.float32), peaks, meta)


ALL_ON = {name: {"p": 1.0} for name in ("background", "affine", "dose", "blur", "defects")}


def test_augmenter_is_deterministic_per_seed_and_index():
    sample = make_sample()
    before = sample.cbed.copy()
    a = Augmenter(ALL_ON, seed=11)
    first, again = a(sample, 3), Augmenter(ALL_ON, seed=11)(sample, 3)
    a(sample, 5)  # calls in between change nothing
    third = a(sample, 3)
    for x in (again, third):
        for key in ("cbed", "probe", "target"):
            np.testing.assert_array_equal(getattr(first, key), getattr(x, key))
        np.testing.assert_array_equal(first.peaks, x.peaks)
        assert first.metadata == x.metadata
    assert not np.array_equal(first.cbed, a(sample, 4).cbed)
    assert not np.array_equal(first.cbed, Augmenter(ALL_ON, seed=12)(sample, 3).cbed)
    np.testing.assert_array_equal(sample.cbed, before)
    record = first.metadata["augmentation"]
    assert {name: record[name] for name in a.draw(3)} == a.draw(3)
    assert set(record) >= {"background", "affine", "dose", "blur", "defects", "origin", "ellipse"}
    assert first.metadata["dose"] == record["dose"]["dose"] and 1e5 <= first.metadata["dose"] <= 1e10
    # Switching one augmentation off leaves the parameters of the others as they were.
    no_blur = Augmenter({**ALL_ON, "blur": None}, seed=11)(sample, 3).metadata["augmentation"]
    assert "blur" not in no_blur and no_blur["affine"] == record["affine"]


def test_augmented_disks_sit_at_their_augmented_labels():
    sample = make_sample()
    config = {"affine": {"p": 1.0, "rotation": [-3.0, 3.0]}, "background": None, "dose": None, "blur": None, "defects": None}
    aug = Augmenter(config, seed=2)
    for index in range(4):
        out = aug(sample, index)
        assert 1 <= len(out.peaks) <= len(sample.peaks)
        for p in out.peaks:
            pos = np.array([p["qx"], p["qy"]], dtype=float)
            assert np.linalg.norm(centroid(out.cbed, pos, 5.5) - pos) < 0.05
        np.testing.assert_allclose(out.metadata["augmentation"]["origin"], [out.peaks["qx"][0], out.peaks["qy"][0]], atol=1e-4)
        # the four reflections redrawn, the tail pushed across the edge or back
        assert out.target.sum() == pytest.approx(sample.target.sum(), rel=0.05)


def test_augmented_targets_are_gaussians_redrawn_at_the_moved_labels():
    """Splatting would move each target maximum off its label by up to 0.1 px with the
    sub-pixel shift and the ellipse; redrawn, a Gaussian fit finds every label exactly."""
    sample = make_sample()
    config = {"affine": {"p": 1.0, "ellipticity": [1.05, 1.15]}, "background": None, "dose": None, "blur": None, "defects": None}
    aug = Augmenter(config, seed=5)
    params = DetectionParams(sigma=0, min_spacing=3, edge=3, min_relative_intensity=0.1)
    splat_error = 0.0
    for index in range(4):
        out = aug(sample, index)
        moved = np.stack([out.peaks["qx"], out.peaks["qy"]], axis=1)
        found = refine_gaussian(out.target[None], find_peaks(out.target[None], params))[0]
        assert len(found) == len(moved)
        for p, height in zip(moved, np.sqrt(out.peaks["intensity_kinematic"]), strict=True):
            k = np.argmin(np.hypot(*(found[:, :2] - p).T))
            assert np.hypot(*(found[k, :2] - p)) < 1e-4 and found[k, 2] == pytest.approx(height, rel=1e-4)
        geometry = {k: out.metadata["augmentation"]["affine"][k] for k in ("ellipticity", "ellipse_angle", "rotation", "shift")}
        splat, _ = affine_distort(sample.target, **geometry, resample="splat")
        old = refine_gaussian(splat[None], find_peaks(splat[None], params))[0]
        splat_error = max(splat_error, max(np.hypot(*(old[:, :2] - p).T).min() for p in moved))
    assert splat_error > 0.05


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"noise": {}}, "background"),
        ({"affine": {"ellipticty": [1, 1.1]}}, "ellipticity"),
        ({"affine": {"ellipticity": [0.9, 1.1]}}, "allowed interval"),
        ({"dose": {"log10_dose": [6]}}, r"\[low, high\]"),
        ({"dose": {"log10_dose": [8, 6]}}, "low <= high"),
        ({"blur": {"p": 2}}, "probability"),
        ({"blur": {"psf": "airy"}}, "gaussian"),
    ],
)
def test_augmenter_config_errors_name_the_fix(config, match):
    with pytest.raises(ConfigurationError, match=match) as err:
        Augmenter(config, seed=0)
    assert isinstance(err.value, StemforgeError) and "Fix:" in str(err.value)


def test_augmenter_background_needs_the_pixel_size():
    sample = make_sample()
    sample.metadata.pop("q_pixel_size")
    with pytest.raises(ConfigurationError, match="q_pixel_size"):
        Augmenter({"background": {"p": 1.0}}, seed=0)(sample, 0)
