"""The paper as code: losses, adaptive layer matching, and the per-step objectives."""
