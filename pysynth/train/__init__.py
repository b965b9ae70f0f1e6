"""Training the segmenter: targets, losses (and, to come, the loop, checkpoints and the GAN stages)."""
