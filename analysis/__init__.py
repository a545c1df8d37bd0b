"""Analysis tools built on the sampler: per-step loss/KL (per_step), resumable sweeps (sweep), results
files and their statistics (results), figures (plots) and Markdown reports (report)."""
