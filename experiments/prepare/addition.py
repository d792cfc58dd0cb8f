"""Generates the 2-digit addition task of the decoder experiment (GSM8K format, JSON lines).

Every pair ``(a, b)`` with ``10 <= a, b <= 99`` (8,100 problems) is shuffled with
``numpy.random.default_rng(SEED)`` (``SEED = 20261207``, public); the first ``--test`` form the
test split, the rest the train split. Each record is::

    {"id": "add/0042", "split": "train", "question": "What is 47 + 35?", "answer": "#### 82"}

so ``ffa_jax.data.gsm.load_gsm`` reads it as a local GSM task (the ``split`` field is honoured)
and scores it by exact match of the number after ``####``. The answer is the bare final line:
the task measures whether short fine-tuning teaches the model to answer in the ``#### <n>``
format within a few greedy tokens, and correctly. The same arguments give a byte-identical file.

    python experiments/prepare/addition.py --out /work/runs/decoder/addition.jsonl
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

SEED = 20261207


def records(test: int) -> list[dict]:
    """The shuffled problems, test split first; ``test`` of the 8,100 are test problems."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    order = np.random.default_rng(SEED).permutation(len(pairs))
    out = []
    for rank, i in enumerate(order):
        a, b = pairs[i]
        out.append(
            {
                "id": f"add/{rank:04d}",
                "split": "test" if rank < test else "train",
                "question": f"What is {a} + {b}?",
                "answer": f"#### {a + b}",
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--test", type=int, default=250, help="test problems (default 250)")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records(args.test)), encoding="utf-8")
    tmp.replace(args.out)  # atomic: a reader never sees a partial file
    print(f"wrote {args.out}: {8100 - args.test} train / {args.test} test problems")


if __name__ == "__main__":
    main()
