"""Evaluation: per-exit loss/accuracy, raw-text perplexity and QA tasks."""
