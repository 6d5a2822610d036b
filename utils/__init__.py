"""Training utilities, one job per module: logging, distributed setup, checkpoints, mixed precision
and metrics."""
