"""Model pieces: Flux transformer with Resonance 2D RoPE + YaRN, the F16 VAE, frozen text encoders."""
