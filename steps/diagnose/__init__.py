"""diagnose: loss-landscape metrics, MD tree, prunability regimes, SharpBalance, dispersion."""
