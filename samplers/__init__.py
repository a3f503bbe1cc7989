"""Posterior samplers over a denoiser callable (pure PyTorch, no ComfyUI import)."""
