"""One file per method. A new method: a dataclass subclassing Compressor (or TokenDropper; an nn.Module where it
has trainable parts, like DPN), decorated with @register("name"), imported here. Its `select` returns a keep mask
or a Merge (or a Route: a layer run by a subset); shared tensor code lives in tokencompress/ops.py, pooling.py and window_merge.py."""

from .base import Compressor, TokenDropper, build, register, registry
from .dpn import DPN
from .fastv import FastV
from .gamma_mod import GammaMoD
from .mustdrop import MustDrop
from .pyramid import StaticPyramid
from .random_drop import RandomDrop

__all__ = [
    "DPN",
    "Compressor",
    "FastV",
    "GammaMoD",
    "MustDrop",
    "RandomDrop",
    "StaticPyramid",
    "TokenDropper",
    "build",
    "register",
    "registry",
]
