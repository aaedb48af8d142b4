"""tokencompress: composable visual-token compression for multimodal LLMs.

import tokencompress as tc
tc.compress(model, tc.FastV(layer=2, keep=0.5))
"""

from .accounting import Stats
from .api import compress, compressed, compressors_of, from_pretrained, save_pretrained, stats, uncompress
from .compressors import Compressor, FastV, RandomDrop, build, register, registry

__version__ = "0.1.0"

__all__ = [
    "Compressor",
    "FastV",
    "RandomDrop",
    "Stats",
    "build",
    "compress",
    "compressed",
    "compressors_of",
    "from_pretrained",
    "register",
    "registry",
    "save_pretrained",
    "stats",
    "uncompress",
]
