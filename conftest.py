import importlib.util

# `python -m catprune` entry point: importing it would run the CLI
collect_ignore = ["src/catprune/__main__.py"]
# the Triton kernels import triton at module level (a CPU-only torch build has none); their doctest-free module is
# tested through catprune.kernels (tests/test_kernels.py)
if importlib.util.find_spec("triton") is None:
    collect_ignore.append("src/catprune/kernels/_triton_kv.py")
