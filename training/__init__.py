"""Training and evaluation of the spine-node models on VinDr-SpineXR (or the phantom)."""
