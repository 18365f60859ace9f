"""The harness that proves parallel layouts against one process (``shard_check``).

Not used by training: the tests, ``benchmarks/`` and ``experiments/`` drive it, and a
user may run it to check a layout of their own before a long run.
"""
