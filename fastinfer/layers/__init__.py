"""Model building blocks. They call kernels only through an :class:`fastinfer.ops.OpSet`."""
