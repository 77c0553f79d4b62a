"""dfj's benchmarks: they import dfj as a user would and are run from a checkout
(`python -m benchmarks.speed …`); nothing under dfj/ imports them. Results go to docs/results/."""
