"""drift: how far each layer's metric moved between two spectral metrics tables.

Takes: two spectral metrics tables (previous, current).
Gives: a drift table (Parquet, one row per layer present in both).
Start reading: step.py.
"""
