"""``python -m retrolm`` (and ``torchrun -m retrolm train ...``): the command line."""

import sys

from retrolm.cli import main

sys.exit(main())
