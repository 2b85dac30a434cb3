"""Loss functions and the cross-worker normalisation they use."""
