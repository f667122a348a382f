"""TTHA: test-time hardware adaptation of mixture-of-experts routers."""

__version__ = "0.1.0"
