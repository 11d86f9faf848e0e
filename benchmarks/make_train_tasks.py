"""Write the synthetic fine-tuning benchmark: checkable tasks, a held-out split, general text.

Seven small tasks with exactly one right answer (upper-casing, reversing and counting the
letters of a word, adding two numbers, sorting digits, reformatting a date, swapping two
words). Train and test draw from disjoint inputs, so the test split is held out. `general.jsonl`
holds the plain English paragraphs of `general_text.txt` (58 paragraphs, ~3,300 tokens of
history, science, cooking, travel, everyday life and fiction, written for this benchmark and
sharing nothing with the task prompts) used to measure forgetting as the change of perplexity on
text unrelated to the tasks. Fully determined by `--seed`.

    python benchmarks/make_train_tasks.py --out /tmp/s2ft-tasks --train 2000 --test 210
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = """apple river stone cloud garden window silver planet forest candle bridge yellow
market spring winter summer animal basket butter castle dinner engine finger flower guitar
hammer island jacket kitten ladder marble needle orange pencil rabbit saddle ticket turtle
violin wallet zipper anchor barrel cactus dragon feather helmet jungle lemon magnet napkin
parrot rocket shadow tomato velvet walnut bottle camera doctor falcon hunter lizard monkey
pepper salmon tunnel wizard cookie copper mirror puzzle spider temple blanket circle pillow
carpet mitten donkey oyster poodle radish sailor tablet cherry domino garlic insect kettle
lantern meadow noodle pirate quartz ribbon sponge thunder toffee walrus badger cobalt
""".split()
GENERAL_TEXT = Path(__file__).with_name("general_text.txt")


def general_paragraphs(path: Path = GENERAL_TEXT) -> list[str]:
    """The held-out English paragraphs: blank-line-separated blocks of `path`, lines joined."""
    blocks = path.read_text(encoding="utf-8").split("\n\n")
    return [" ".join(block.split()) for block in blocks if block.strip()]


def task_examples(rng: random.Random, words: list[str]) -> list[tuple[str, str, str]]:
    """One example of each task as (task, prompt, answer), drawing inputs from `words`."""
    w, v = rng.sample(words, 2)
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    digits = [rng.randint(0, 9) for _ in range(4)]
    y, m, d = rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)
    return [
        ("upper", f"Uppercase: {w}\nAnswer:", w.upper()),
        ("reverse", f"Reverse the letters: {w}\nAnswer:", w[::-1]),
        ("length", f"Number of letters in {w}\nAnswer:", str(len(w))),
        ("add", f"Add: {a} + {b}\nAnswer:", str(a + b)),
        ("sort", f"Sort the digits: {' '.join(map(str, digits))}\nAnswer:", " ".join(map(str, sorted(digits)))),
        ("date", f"Write {y}-{m:02d}-{d:02d} as DD/MM/YYYY\nAnswer:", f"{d:02d}/{m:02d}/{y}"),
        ("swap", f"Swap the words: {w} {v}\nAnswer:", f"{v} {w}"),
    ]


def generate(out: Path, train: int, test: int, seed: int) -> None:
    rng = random.Random(seed)
    words = list(WORDS)
    rng.shuffle(words)
    held_out = words[: len(words) // 4]  # test words never appear in training
    train_words = words[len(words) // 4:]
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train.jsonl": (train, train_words), "test.jsonl": (test, held_out)}
    for name, (count, pool) in splits.items():
        seen: set[str] = set()
        with open(out / name, "w") as f:
            written = 0
            while written < count:
                for task, prompt, answer in task_examples(rng, pool):
                    if written >= count or (name == "test.jsonl" and prompt in seen):
                        continue
                    seen.add(prompt)
                    f.write(json.dumps({"task": task, "prompt": prompt, "completion": " " + answer}) + "\n")
                    written += 1
    with open(out / "general.jsonl", "w") as f:
        for text in general_paragraphs():
            f.write(json.dumps({"text": text}) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/s2ft-tasks")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--test", type=int, default=210)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    generate(Path(args.out), args.train, args.test, args.seed)
    print(json.dumps({"out": args.out, "train": args.train, "test": args.test, "seed": args.seed}))


if __name__ == "__main__":
    main()
