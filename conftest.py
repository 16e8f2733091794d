# `python -m catprune` entry point: importing it would run the CLI
collect_ignore = ["src/catprune/__main__.py"]
