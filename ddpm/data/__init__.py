"""Data: the datasets (digits, MNIST, Fashion-MNIST, CIFAR-10, an image folder), the held-out split,
the uint8 <-> model-range conversions, and image grids.
"""
