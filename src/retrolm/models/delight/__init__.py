"""DeLighT (Mehta et al., "DeLighT: Deep and Light-weight Transformer", ICLR 2021):
the DExTra transformation and the DeLighT block. Block-wise scaling across a stack is
``retrolm.nn.depth_width_schedule("block", ...)``; the group linear is ``nn.GroupLinear``."""

from retrolm.models.delight.block import DeLighTBlock
from retrolm.models.delight.dextra import DExTra, GLTShape, dextra_layers, mix

__all__ = ["DExTra", "DeLighTBlock", "GLTShape", "dextra_layers", "mix"]
