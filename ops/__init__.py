"""Operators: DCNv3 (pure-PyTorch reference and fused kernels) and its nn.Module."""
