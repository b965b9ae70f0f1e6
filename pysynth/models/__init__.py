"""Networks: the two-head U-Net segmenter (and, later, the refiner and discriminator)."""
