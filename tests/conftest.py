import torch

# The test tensors are small: one thread is faster than two, and it keeps timings stable when the
# machine is shared.
torch.set_num_threads(1)
