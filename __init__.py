"""OCD: learning to overfit with conditional diffusion models."""
__version__ = "0.1.0"
