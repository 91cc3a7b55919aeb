"""Pure-PyTorch references of every ddfast op.

They are the fallback when the extension is missing or the device unsupported, the oracle of the tests
and the baseline of the benchmarks. Written for clarity and exactness, not speed.
"""
from .convnet import *  # noqa: F401,F403
from .krr import *  # noqa: F401,F403
from .trajectory import *  # noqa: F401,F403
from .trust import *  # noqa: F401,F403
