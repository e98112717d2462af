"""Analyses on datacubes: virtual imaging, calibration, disk detection, strain, phase, identity."""
