"""Training-time assignment of ground-truth instances to feature locations."""
