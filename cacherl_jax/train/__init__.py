"""Training: losses, optimizer, checkpoints, metrics, the SFT trainer and `cacherl plan`."""
