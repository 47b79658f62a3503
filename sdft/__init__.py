"""sdft: Self-Distillation Fine-Tuning for language models.

`sdft.losses` is standalone (imports only torch); the rest of the package wires a local Hugging Face
backend (or the Tinker API) into one training loop.
"""

__version__ = "0.1.0"
