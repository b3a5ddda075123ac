"""Stage 4: pretraining's config sections and schedule, the optimizer, one optimizer step (shared with the
benchmarks) and the run's metrics. The run object that composes them is pipelines/trainer.py."""
