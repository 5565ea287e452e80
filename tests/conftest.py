"""Suite-wide settings: keep torch to the 2 cores the CI machines have."""

import torch

torch.set_num_threads(2)
