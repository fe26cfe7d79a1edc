"""Training loops: F16 VAE decoder post-training and two-stage DiT training (seed Sec. 2.2)."""
