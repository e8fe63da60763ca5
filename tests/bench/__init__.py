"""dbkit benchmarks: `python -m tests.bench` (or `nox -s bench`).  Not collected by pytest."""
