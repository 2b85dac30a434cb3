"""COCO-format results, pycocotools mask evaluation and metric reports."""
