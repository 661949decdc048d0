"""Answer extraction, normalization, grading and voting for math benchmarks."""
