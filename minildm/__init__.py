"""minildm: latent diffusion from first principles.

One idea per module; the notebooks in ``notebooks/`` import from here.
"""

__version__ = "0.1.0"
