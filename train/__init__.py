"""Hydra entry points that fit models and export them to the zoo."""
