"""Training: config, data, samplers, losses, exit heads, the loop and its distributed/resume plumbing."""
