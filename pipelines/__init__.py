"""Loaders, DeepSpeed trainer, export and evaluation jobs (issues #4-#6)."""
