"""One file per method. A new method: a dataclass subclassing Compressor (or TokenDropper), decorated with
@register("name"), imported here."""

from .base import Compressor, TokenDropper, build, register, registry
from .dpn import DPN
from .fastv import FastV
from .mustdrop import MustDrop
from .pyramid import StaticPyramid
from .random_drop import RandomDrop

__all__ = [
    "DPN",
    "Compressor",
    "FastV",
    "MustDrop",
    "RandomDrop",
    "StaticPyramid",
    "TokenDropper",
    "build",
    "register",
    "registry",
]
