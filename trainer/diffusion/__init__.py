"""Diffusion arithmetic: noise schedules (as diffusers computes them), the training loss, and the
reference sampler (DDIM, Euler) whose outputs the engine's parity tests replay."""
