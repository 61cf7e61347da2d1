"""ccld-trt: an optimized inference runtime for CLOOB-conditioned latent diffusion."""

__version__ = "0.1.0"
