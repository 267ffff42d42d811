"""Under pytest-xdist (the default run: -n auto), each worker computes on one thread: the workers share the cores."""
import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
