"""Hypothesis settings of the fuzz tests: bounded and repeatable in CI, longer in bench/fuzz.py.

TAILWISE_FUZZ_EXAMPLES sets the examples per test (default 150); with TAILWISE_FUZZ_RANDOM=1
the examples come from pytest's --hypothesis-seed instead of a fixed derandomised sequence.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

FUZZ = settings(max_examples=int(os.environ.get("TAILWISE_FUZZ_EXAMPLES", "150")),
                derandomize=os.environ.get("TAILWISE_FUZZ_RANDOM") != "1", deadline=None,
                database=None, suppress_health_check=[HealthCheck.too_slow])
