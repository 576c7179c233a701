"""Build the chat datasets from the instruction data next door: no new text, only its shape changes.

Each conversation is a system message and two user/assistant exchanges, the pairs of
`../instructions/<split>.jsonl` taken two by two in order, under the field `messages` as the Hub's
chat datasets and TRL have it. Run from anywhere: `python examples/data/chat/make_chat.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
INSTRUCTIONS = HERE.parent / "instructions"
SYSTEM = "You are a helpful assistant who answers briefly."


def conversations(pairs: list[dict[str, str]]) -> list[dict[str, list[dict[str, str]]]]:
    out = []
    for first, second in zip(pairs[0::2], pairs[1::2], strict=False):
        messages = [{"role": "system", "content": SYSTEM}]
        for pair in (first, second):
            messages += [{"role": "user", "content": pair["prompt"]},
                         {"role": "assistant", "content": pair["response"]}]
        out.append({"messages": messages})
    return out


def main() -> None:
    for split in ("train", "eval"):
        lines = (INSTRUCTIONS / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        pairs = [json.loads(line) for line in lines if line.strip()]
        rows = conversations(pairs)
        with (HERE / f"{split}.jsonl").open("w", encoding="utf-8", newline="\n") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{split}.jsonl: {len(rows)} conversations")


if __name__ == "__main__":
    main()
