"""The UniInst model, its building blocks and its inference post-processing."""
