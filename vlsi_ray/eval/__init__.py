"""Evaluation: accuracy on the synthetic task, benchmark readers and scoring, predictors, traces, reports and plots."""
