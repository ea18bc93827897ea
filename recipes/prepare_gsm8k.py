"""Write GSM8K as rlfree prompts: `gsm8k_train.jsonl` (and `gsm8k_test.jsonl`) with `messages` and `answer` columns.

    python recipes/prepare_gsm8k.py                 # then: rlfree run --config recipes/qwen_gsm8k.yaml
    python recipes/prepare_gsm8k.py --output_dir data --limit 1000

`rlfree generate --prompts` reads a Hub id with one split but no config, and GSM8K on the Hub (`openai/gsm8k`) has two
configs (`main`, `socratic`) and `question`/`answer` columns, so this script downloads `openai/gsm8k` (config `main`)
with `datasets.load_dataset` and writes one JSON line per problem:

    {"messages": [{"role": "system", ...}, {"role": "user", "content": question + instruction}], "answer": "72"}

`answer` is the number after `####` in GSM8K's solution (commas removed); `rlfree.rewards.verifiers:gsm8k_accuracy` reads
either form. Needs network access to the Hugging Face Hub; it was not run where rlfree's tests run (offline).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SYSTEM = "You are a helpful assistant that solves math word problems step by step."
INSTRUCTION = "\n\nSolve the problem step by step, then put the final answer (a number) on the last line after ####."


def to_row(example: dict) -> dict:
    answer = example["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": example["question"].strip() + INSTRUCTION},
    ]
    return {"messages": messages, "answer": answer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=".", help="Folder for gsm8k_train.jsonl and gsm8k_test.jsonl.")
    parser.add_argument("--limit", type=int, default=None, help="Keep only the first N problems of each split.")
    args = parser.parse_args()

    from datasets import load_dataset

    gsm8k = load_dataset("openai/gsm8k", "main")
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        rows = gsm8k[split]
        if args.limit is not None:
            rows = rows.select(range(min(args.limit, len(rows))))
        path = Path(args.output_dir) / f"gsm8k_{split}.jsonl"
        with path.open("w") as file:
            for example in rows:
                file.write(json.dumps(to_row(example)) + "\n")
        print(f"wrote {len(rows)} prompts to {path}")


if __name__ == "__main__":
    main()
