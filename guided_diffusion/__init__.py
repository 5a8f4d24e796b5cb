"""guided-diffusion: ADM diffusion models and classifier guidance (Dhariwal & Nichol 2021).

The original's module names are the public import paths, e.g.
``from guided_diffusion.script_util import create_model_and_diffusion``.
"""

__version__ = "0.1.0"
