"""MedGAN-SSM: synthesize a missing MRI contrast with a selective state-space conditional GAN."""

__version__ = "0.1.0"
