"""Quality and parity measurement of exported judges."""
