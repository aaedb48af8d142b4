"""tokencompress: composable visual-token compression for multimodal LLMs.

import tokencompress as tc
tc.compress(model, tc.FastV(layer=2, keep=0.5))
"""

from .accounting import Stats
from .api import (
    compress,
    compressed,
    compressor_parameters,
    compressors_of,
    from_pretrained,
    save_pretrained,
    stats,
    uncompress,
)
from .arank import ARank, arank
from .compressors import (
    DPN,
    Compressor,
    FastV,
    GammaMoD,
    MustDrop,
    RandomDrop,
    StaticPyramid,
    build,
    register,
    registry,
)
from .routing import ROUTER_TOKEN, add_routing_token, with_routing_token
from .view import Merge, Route, VisualView

__version__ = "0.1.0"

__all__ = [
    "ARank",
    "DPN",
    "GammaMoD",
    "Route",
    "arank",
    "ROUTER_TOKEN",
    "Compressor",
    "Merge",
    "MustDrop",
    "StaticPyramid",
    "VisualView",
    "add_routing_token",
    "with_routing_token",
    "FastV",
    "RandomDrop",
    "Stats",
    "build",
    "compress",
    "compressed",
    "compressor_parameters",
    "compressors_of",
    "from_pretrained",
    "register",
    "registry",
    "save_pretrained",
    "stats",
    "uncompress",
]
