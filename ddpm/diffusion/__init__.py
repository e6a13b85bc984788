"""The diffusion maths: beta schedules (pure functions), the forward process q(x_t|x_0) and the
reverse step's Gaussian, the sampling loop with its swappable step rules, and the timestep grids.
Nothing here knows the network or the pipeline.
"""
