"""Studies that train models and write what they measure: CSVs under docs/data/, plots under
docs/img/, runs and TensorBoard logs under runs/ (``python -m experiments.<name>`` from the
repository root). Micro-benchmarks that only print ratios live in ``benchmarks/``."""
