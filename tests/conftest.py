import os

# Triton reads TRITON_INTERPRET when @triton.jit decorates, so it must be set
# before any kernel module is imported. With no GPU, the interpreter is the
# only way the Triton kernels run at all.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
