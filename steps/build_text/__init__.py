"""build_text: a built-in text corpus split (King James Bible, fortunes) as a text artifact.

Takes: a corpus and split name (no inputs).
Gives: a text artifact (UTF-8), for calibration or perplexity.
Start reading: step.py; the corpora are in steps/core/data.py.
"""
