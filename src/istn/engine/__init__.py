"""Training, evaluation, refinement and checkpoints."""
