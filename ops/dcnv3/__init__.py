"""DCNv3: deformable convolution with group-wise, softmax-normalised sampling.

``dcnv3`` is the functional op (backends: ``reference``, pure PyTorch; ``compiled``, the
same fused by torch.compile, for CPU; ``triton``, fused GPU kernels when available;
``auto`` picks the best for the tensor's device and size). ``DCNv3`` is the
module InternImage uses.
"""

from ops.dcnv3.function import available_backends, dcnv3, output_size
from ops.dcnv3.module import DCNv3

__all__ = ["DCNv3", "available_backends", "dcnv3", "output_size"]
