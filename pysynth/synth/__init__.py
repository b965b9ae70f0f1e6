"""Initial synthesis: random polygon nuclei painted into real tissue texture (the GAN-free module)."""
