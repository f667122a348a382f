"""Hydra sweeper plugin for Optuna >= 4 (see README)."""
