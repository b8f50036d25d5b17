"""Shared test setup."""

import torch

# The tiny models are far too small for intra-op parallelism to pay off, and on a busy 2-core machine the extra
# threads only contend: one 28-token generate() took 35 s with the default thread count and 0.2 s with one thread.
torch.set_num_threads(1)
