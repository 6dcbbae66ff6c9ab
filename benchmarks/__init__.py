"""Micro-benchmarks: each times a few candidates side by side in one run (interleaved, so machine
load hits them alike) and prints their ratios; absolute times depend on the machine, the ratios
are the result. Run one from the repository root as ``python -m benchmarks.<name>`` (``--help``
for its options); ``benchmarks/RESULTS.md`` has the measured tables and the commands behind them.

Studies that train models and write CSVs and plots under ``docs/`` (the LM comparison, the
continual-learning sweep, the long-context evaluation) live in ``experiments/``.
"""
