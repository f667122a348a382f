"""Test set-up: Triton's interpreter on machines without a GPU, and a shared tmp launch dir."""
import os

import torch

# Triton reads TRITON_INTERPRET at import: set it before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
