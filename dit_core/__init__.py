"""dit_core: the Diffusion Transformer, its diffusion process and samplers, in pure PyTorch."""
