"""Sharding tools: image sets -> WebDataset / FFCV shards with a manifest (issue #3)."""
