"""The network and its CPU ops: the UNet (unet.py, the model only), the speed dispatch of its
GroupNorm and attention (ops.py), the fused C kernels behind one switch (kernels.py, kernels.c) and the
process-wide speed settings (speed.py). Nothing here knows the noise schedule.
"""
