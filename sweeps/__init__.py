"""Named sweeps, installed as the package ttha.sweeps (pyproject's package-dir) so an installed ttha finds them."""
