"""Benchmarks: every project backend against the official pcDEQ loop and torchdeq, on the same data.

    python -m pcdeq_kernels.bench --quick            # CPU-friendly grid, < 3 minutes
    python -m pcdeq_kernels.bench --device cuda      # the full grid on a GPU

``paths.py`` defines what is compared (shared with the pytest-benchmark files under benchmarks/),
``timing.py`` how it is timed, ``report.py`` the table, JSON and plots.
"""
