"""Tests of the pipelines package (storage, loaders, jobs)."""
