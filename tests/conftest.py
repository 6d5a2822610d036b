import os
import sys
from pathlib import Path

import torch

# Without a GPU the fused Triton attention kernels run on CPU tensors through Triton's interpreter; it must be chosen
# before the kernels are defined (when ``models`` is first imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(2)  # the golden fixtures were produced with 2 threads
# Where a GPU runs the tests, fp32 must mean fp32: no TF32 in convolutions or matrix products.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
