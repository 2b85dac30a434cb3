"""Ray integration: shard preparation, streaming data, distributed training and search (imports Ray)."""
