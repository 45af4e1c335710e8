"""The Stable Diffusion models in plain PyTorch: tokenizer, text encoders, UNet, VAE, DDIM, the pipeline."""
