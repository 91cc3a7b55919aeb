"""ddfast: dataset distillation as a label denoiser.

DATM (with MTT's loss and TESLA's constant-memory gradient), DANCE and RCIG distillers, the trust-aware
diversion wrapper TAD, and fused C++/CUDA ops for their hot paths (``ddfast.ops``).
"""

import logging as _logging

__version__ = "0.1.0"

# a library adds no log handler of its own: without one configured by the application, Python's last-resort
# handler would print every ddfast warning a second time beside its ``warnings.warn``
_logging.getLogger("ddfast").addHandler(_logging.NullHandler())

__all__ = ["__version__"]
