"""Datacube readers and writers, training-shard stores, torch datasets and augmentation."""
