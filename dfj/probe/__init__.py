"""Probes of how a judge behaves under hostile responses. `corpus`: the versioned injection templates;
`stats`: the metrics over clean and attacked verdicts."""
