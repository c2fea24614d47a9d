"""``python -m retrolm.cli`` (as ``python -m retrolm``)."""

import sys

from retrolm.cli.main import main

sys.exit(main())
