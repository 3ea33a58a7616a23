"""A long fuzz run of the parsers that read untrusted files (CI runs a short, fixed one).

    python bench/fuzz.py [--examples 5000] [--seed N] [--timeout 3600]

Runs the hypothesis tests of tests/hardening/ (the safetensors header reader, the
manifest, cache-entry, named-ref and step-request JSON readers, the plain-model and HF
config readers) with `--examples` examples each, drawn from `--seed` (printed, so a
failure can be replayed) instead of CI's fixed sequence. Prints each test's examples and
time, and the totals; exits non-zero when any input made a reader fail uncleanly.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FUZZ_TESTS = ["tests/hardening/test_fuzz_safetensors.py", "tests/hardening/test_fuzz_json.py"]
# hypothesis --hypothesis-show-statistics: "- during generate phase (12.34 seconds):"
# then "- 5000 passing, 0 failing, and 12 invalid test cases"
TEST_LINE = re.compile(r"^(tests/\S+::\S+):\s*$")
PHASE = re.compile(r"during generate phase \(([\d.]+) seconds\)")
EXAMPLES = re.compile(r"(\d+) passing, (\d+) failing, and (\d+) invalid")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=5000, help="examples per test")
    parser.add_argument("--seed", type=int, default=random.SystemRandom().randrange(2**32),
                        help="hypothesis seed (default: random, printed)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds for the whole run")
    return parser.parse_args()


def statistics(output: str) -> list[tuple[str, int, int, float]]:
    """(test, passing, failing, seconds) per fuzz test, from hypothesis' statistics."""
    rows, test, seconds = [], None, 0.0
    for line in output.splitlines():
        if match := TEST_LINE.match(line.strip()):
            test = match.group(1)
        elif test and (match := PHASE.search(line)):
            seconds = float(match.group(1))
        elif test and (match := EXAMPLES.search(line)):
            rows.append((test.split("::")[-1], int(match.group(1)), int(match.group(2)),
                         seconds))
            test = None
    return rows


def main() -> int:
    args = parse_args()
    env = os.environ | {"TAILWISE_FUZZ_EXAMPLES": str(args.examples),
                        "TAILWISE_FUZZ_RANDOM": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pytest", *FUZZ_TESTS, "-q", "-p", "no:cacheprovider",
               f"--hypothesis-seed={args.seed}", "--hypothesis-show-statistics",
               f"--timeout={args.timeout}"]
    print(f"fuzzing with {args.examples} examples per test, seed {args.seed}", flush=True)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=args.timeout + 60)
    rows = statistics(done.stdout)
    print(f"{'test':<58} {'examples':>9} {'failing':>8} {'s':>8}")
    for test, passing, failing, seconds in rows:
        print(f"{test:<58} {passing:>9} {failing:>8} {seconds:>8.1f}")
    total = sum(r[1] for r in rows)
    print(f"{len(rows)} fuzz tests, {total} examples, {sum(r[3] for r in rows):.0f} s; "
          f"pytest: {done.stdout.strip().splitlines()[-1] if done.stdout.strip() else '?'}")
    if done.returncode:
        failures = done.stdout.split("Hypothesis Statistics")[0]
        print(failures[-8000:], done.stderr[-3000:], sep="\n")
        print(f"replay: TAILWISE_FUZZ_EXAMPLES={args.examples} TAILWISE_FUZZ_RANDOM=1 "
              f"pytest {' '.join(FUZZ_TESTS)} --hypothesis-seed={args.seed}")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
