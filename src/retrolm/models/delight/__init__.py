"""DeLighT (Mehta et al., "DeLighT: Deep and Light-weight Transformer", ICLR 2021): the
DExTra transformation, the DeLighT block, the DeFINE embedding and the language model
``DeLighTLM`` (with OpenELM's layer-wise scaled blocks as its second block kind). Block-wise
scaling across a stack is ``retrolm.nn.depth_width_schedule("block", ...)``; the group
linear is ``nn.GroupLinear``."""

from retrolm.models.delight.block import DeLighTBlock
from retrolm.models.delight.cache import DeLighTCache
from retrolm.models.delight.config import DeLighTConfig
from retrolm.models.delight.define import DeFINE
from retrolm.models.delight.dextra import DExTra, GLTShape, dextra_layers, mix
from retrolm.models.delight.model import BlockStats, DeLighTLM, format_block_table
from retrolm.models.delight.openelm import OpenELMBlock

__all__ = [
    "BlockStats",
    "DExTra",
    "DeFINE",
    "DeLighTBlock",
    "DeLighTCache",
    "DeLighTConfig",
    "DeLighTLM",
    "GLTShape",
    "OpenELMBlock",
    "dextra_layers",
    "format_block_table",
    "mix",
]
