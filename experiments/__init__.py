"""Studies that write the CSVs under docs/data/ and the plots under docs/img/ (``python -m experiments.<name>``)."""
