"""One file per method. A new method: a dataclass subclassing Compressor (or TokenDropper), decorated with
@register("name"), imported here."""

from .base import Compressor, TokenDropper, build, register, registry
from .fastv import FastV
from .random_drop import RandomDrop

__all__ = ["Compressor", "TokenDropper", "FastV", "RandomDrop", "build", "register", "registry"]
