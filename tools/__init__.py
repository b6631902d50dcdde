"""Command-line tools (step-time benchmark)."""
