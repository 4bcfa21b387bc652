"""Evaluation: accuracy on the synthetic task, reports and plots."""
