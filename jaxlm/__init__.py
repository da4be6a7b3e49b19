"""jaxlm: train, align and study decoder-only language models in JAX/Flax."""

from pathlib import Path

__version__ = "0.1.0"

ASSETS = Path(__file__).resolve().parent / "assets"  # small data shipped for the quickstart and tests
