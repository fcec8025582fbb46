"""wgan_gp: registered by its family module until the split commit."""
