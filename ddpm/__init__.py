"""DDPM: a small, exact and fast denoising-diffusion library (Ho et al. 2020) behind a DVC pipeline.

``from ddpm import Unet, GaussianDiffusion, LearnedGaussianDiffusion, Trainer`` gives the API of
denoising-diffusion-pytorch.
"""
from ddpm.api import GaussianDiffusion, LearnedGaussianDiffusion, Trainer
from ddpm.nn.unet import Unet

__all__ = ["Unet", "GaussianDiffusion", "LearnedGaussianDiffusion", "Trainer"]
