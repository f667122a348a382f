"""Hydra configs, installed as the package ttha.conf (pyproject's package-dir) so an installed ttha finds them."""
