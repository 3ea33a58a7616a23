"""diagnose: loss-landscape metrics, MD tree, prunability regimes, SharpBalance, dispersion.

Takes: plain models (and a zoo, tree or retrained cells, by mode); trains with core.training.
Gives: landscape features, a diagnosis and report, a fitted MD tree, regimes and advice.
Start reading: step.py (one function per mode), then features.py and regimes.py.
"""
