"""Post-training elasticity: importance reordering, the budget router, measured latency tables."""
