"""Stage 6: evaluation of exports: k-NN, linear probe, fine-tuning, the checks of eval inputs, the jobs and
the report."""
