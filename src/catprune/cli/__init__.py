"""Command-line interface: ``catprune generate``, ``catprune env``."""
