"""Data pipeline: COCO-format reading, transforms, batching and the synthetic dataset."""
