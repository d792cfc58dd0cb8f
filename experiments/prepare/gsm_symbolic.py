"""Generates the shipped GSM8K-style math set ``ffa_jax/data/assets/gsm_symbolic.jsonl.gz``.

Uses reasoning-gym's ``gsm_symbolic`` generator (Apache-2.0; GSM-Symbolic templates, numeric
answers, GSM8K-style chain of thought ending in ``#### <answer>``). reasoning-gym is heavy
(~350 MB, compiles several packages) and is not a dependency of ffa_jax: this script runs it in
a temporary virtual environment and writes a small JSONL file that ships with the package.

Run from the repository root (needs the PyPI registry)::

    python experiments/prepare/gsm_symbolic.py                 # creates /tmp/gsm-rg-venv
    python experiments/prepare/gsm_symbolic.py --python /path/to/python-with-reasoning-gym

Output lines, sorted by ``id``::

    {"id": "gsm_symbolic/00042", "split": "train", "template": 17,
     "question": "...", "answer": "...\\n#### 70"}

i.e. the GSM8K format (``question``, ``answer``) plus an id, the split and the GSM-Symbolic
template index. Conversion: reasoning-gym appends " Give the result as your final answer. Do
not include units." to every question; it is removed (ffa_jax's prompt adds its own
instruction, the same for every source). ``answer`` is ``metadata["answer_cot"]``, whose final ``#### 168.0`` is rewritten
``#### 168`` when it equals the generator's answer (four templates print floats);
rows whose ``#### N`` still differs from that answer, and repeated questions, are dropped.
The last ``--test`` unique examples (in generation order) form the test split. The file is
gzip'd with no name and mtime 0, so the same inputs give byte-identical output.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import pathlib
import subprocess
import sys
import tempfile
import venv

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "ffa_jax" / "data" / "assets" / "gsm_symbolic.jsonl.gz"
REASONING_GYM = "reasoning-gym==0.1.25"
SUFFIX = " Give the result as your final answer. Do not include units."

# Runs inside the reasoning-gym environment; prints one JSON object per line.
GENERATOR = r"""
import json, sys
import reasoning_gym
size, seed = int(sys.argv[1]), int(sys.argv[2])
ds = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)
for i in range(size):
    x = ds[i]
    print(json.dumps({"index": i, "template": ds.task_indices[i], "question": x["question"],
                      "answer": x["answer"], "answer_cot": x["metadata"]["answer_cot"]}))
"""


def _python_with_reasoning_gym(python: str | None, env_dir: pathlib.Path) -> str:
    if python:
        return python
    exe = env_dir / "bin" / "python"
    if not exe.exists():
        print(f"creating {env_dir} and installing {REASONING_GYM} (~350 MB)...", flush=True)
        venv.create(env_dir, with_pip=True)
        subprocess.run([str(exe), "-m", "pip", "install", "-q", REASONING_GYM], check=True)
    return str(exe)


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def convert(raw: list[dict], n_test: int) -> tuple[list[dict], dict]:
    seen, rows, dropped = set(), [], {"duplicate": 0, "answer_mismatch": 0}
    for r in raw:
        q = r["question"].removesuffix(SUFFIX).strip()
        cot = r["answer_cot"].strip()
        answer = str(r["answer"]).strip()
        body, sep, final = cot.rpartition("####")
        final = final.strip().replace(",", "")
        if sep and final != answer and _same_number(final, answer):
            cot = f"{body}#### {answer}"  # four templates print "#### 168.0" for 168
            final = answer
        if not sep or final != answer:
            dropped["answer_mismatch"] += 1
            continue
        if q in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(q)
        rows.append(
            {
                "id": f"gsm_symbolic/{r['index']:05d}",
                "template": r["template"],
                "question": q,
                "answer": cot,
            }
        )
    for i, row in enumerate(rows):
        row["split"] = "test" if i >= len(rows) - n_test else "train"
    rows = [{k: row[k] for k in ("id", "split", "template", "question", "answer")} for row in rows]
    return sorted(rows, key=lambda r: r["id"]), dropped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2000, help="examples to generate")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--test", type=int, default=250, help="examples in the test split")
    ap.add_argument("--python", help="a python that has reasoning-gym installed")
    ap.add_argument("--env", default=str(pathlib.Path(tempfile.gettempdir()) / "gsm-rg-venv"))
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    python = _python_with_reasoning_gym(args.python, pathlib.Path(args.env))
    res = subprocess.run(
        [python, "-c", GENERATOR, str(args.size), str(args.seed)],
        check=True,
        capture_output=True,
        text=True,
    )
    version = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('reasoning_gym'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    raw = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    rows, dropped = convert(raw, args.test)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
        for r in rows:
            gz.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
    out = pathlib.Path(args.out)
    out.write_bytes(buf.getvalue())
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "test")}
    print(
        json.dumps(
            {
                "reasoning_gym": version,
                "size": args.size,
                "seed": args.seed,
                "kept": len(rows),
                "splits": counts,
                "dropped": dropped,
                "templates": len({r["template"] for r in rows}),
                "bytes": len(buf.getvalue()),
                "sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
                "python": sys.version.split()[0],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
