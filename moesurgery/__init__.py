"""moesurgery: Mixture-of-Experts surgery on Hugging Face checkpoints."""

__version__ = "0.1.0"
