"""Speed and memory benchmarks of the pipeline: ``python -m benchmarks`` (see ``benchmarks/__main__.py``).

Not part of the test suite: the figures depend on the machine. Every figure is a median over repeated runs, shown
with its min and max, and every cost is measured beside a floor taken in the same run on the same machine.
"""
