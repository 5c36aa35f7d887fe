"""What the Triton kernels can take, without importing Triton (the backend module reads these to say,
before any kernel is compiled, which problems the Triton backend cannot solve).

The kernels compute in float32 and index with 32-bit offsets and counters."""

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # operands; the state is float32
MAX_ITER = 2**30  # the step counter is a 32-bit int
MAX_DIM = 46340  # dense: d * d < 2**31, W is indexed with 32-bit offsets
MAX_BATCH = 2**28  # 6 * B < 2**31: the stepwise loops' per-row buffers are indexed with 32-bit offsets
MAX_CHANNELS = 15447  # conv: 9 * C^2 < 2**31
MAX_IMAGE = 2**31 - 1  # conv: C * H * W < 2**31
