"""The paper's spiking models, at the repository's top level where train/ and bench/ import them.

The code is ``mpd_triton.models`` (installed with the library, ``mt.models.build`` / ``mt.models.load``);
this folder re-exports it, so that ``from models import build_model`` and ``mpd_triton.models`` are one
and the same code.
"""

from mpd_triton.models import *  # noqa: F401,F403
from mpd_triton.models import __all__  # noqa: F401
