"""DDPM: a small, exact and fast denoising-diffusion library (Ho et al. 2020) behind a DVC pipeline.

``from ddpm import Unet, GaussianDiffusion, Trainer`` gives the API of denoising-diffusion-pytorch.
"""
from ddpm.api import GaussianDiffusion, Trainer
from ddpm.nn.unet import Unet

__all__ = ["Unet", "GaussianDiffusion", "Trainer"]
