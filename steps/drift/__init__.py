"""drift: how far each layer's metric moved between two spectral metrics tables."""
