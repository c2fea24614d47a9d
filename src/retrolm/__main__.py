"""``python -m retrolm`` (and ``torchrun -m retrolm train ...``): the command line."""

from retrolm.cli import entry

entry()
