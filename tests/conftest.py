"""Test-wide settings.

Tests use tiny models, where thread start-up costs more than it saves; one intra-op thread
also keeps the suite's speed stable on a shared 2-core machine (CI runs there).
"""

import torch

torch.set_num_threads(1)
