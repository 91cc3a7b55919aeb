"""ddfast: dataset distillation as a label denoiser.

DATM (with MTT's loss and TESLA's constant-memory gradient), DANCE and RCIG distillers, the trust-aware
diversion wrapper TAD, and fused C++/CUDA ops for their hot paths (``ddfast.ops``).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
