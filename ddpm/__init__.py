"""DDPM: a small, exact and fast denoising-diffusion library (Ho et al. 2020) behind a DVC pipeline."""
