"""The data `fastmoe train` trains on: the built-in records, a local .json/.jsonl file or a Hub data set, and the record
shapes trl's SFTTrainer reads ("messages", "prompt"/"completion", "text"), instruction data converted to them."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fastmoe.api import looks_like_path


def load_records(dataset: str | None):
    """The data set as a `datasets.Dataset`: the built-in records, a local .json/.jsonl file or a hub data set."""
    from datasets import Dataset

    if dataset is None:
        from fastmoe.builtin import builtin_records

        return Dataset.from_list(builtin_records())
    path = Path(dataset).expanduser()
    if path.is_file():
        return Dataset.from_list(_read_json_records(path))
    if path.is_dir() or not looks_like_path(dataset):
        return _load_hub_dataset(dataset)
    raise FileNotFoundError(f"dataset file {dataset!r} does not exist")


def _read_json_records(path: Path) -> list[dict]:
    """A .jsonl file (one object per line) or a .json file holding a list of objects. Errors name the file's line."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl" or (not text.lstrip().startswith("[")):
        records = []
        # Split on newlines only: str.splitlines() also splits at U+2028 and U+0085, which JSON strings may hold.
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"dataset file {str(path)!r}, line {number}: not valid JSON ({error.msg}, "
                                 f"column {error.colno}); a .jsonl file holds one JSON object per line") from error
            if not isinstance(record, dict):
                raise ValueError(f"dataset file {str(path)!r}, line {number}: a JSON {type(record).__name__}, where "
                                 "each line must be one JSON object")
            records.append(record)
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"dataset file {str(path)!r} is not valid JSON: {error}") from error
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"dataset file {str(path)!r} must hold JSON objects (a list of them, or one per line)")
    if not records:
        raise ValueError(f"dataset file {str(path)!r} holds no records")
    return records


def _load_hub_dataset(name: str):
    import datasets

    try:
        loaded = datasets.load_dataset(name, split="train")
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as error:
        raise FileNotFoundError(
            f"could not load the data set {name!r}: it is neither a local .json/.jsonl file nor a reachable "
            f"Hugging Face Hub data set with a train split ({error.__class__.__name__}: {error})"
        ) from error
    if len(loaded) == 0:
        raise ValueError(f"data set {name!r} has no records in its train split")
    return loaded


def record_format(columns) -> str:
    """Which of the accepted record shapes a data set has, in order of preference: "messages" (chat turns),
    "prompt_completion", "instruction" ("instruction"/"response", or Alpaca's "instruction"/"input"/"output"),
    or "text". Raises ValueError for anything else."""
    columns = set(columns)
    if "messages" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "instruction" in columns and ({"response", "output"} & columns):
        return "instruction"
    if "text" in columns:
        return "text"
    raise ValueError(
        f"the data set's records have no field to train on (found {sorted(columns)}); give each record "
        '"messages", "prompt" and "completion", "instruction" and "response", or "text"'
    )


def to_sft_dataset(dataset, tokenizer):
    """Keep or convert the columns trl's SFTTrainer trains on, and say whether the loss is on assistant turns only.

    Returns (dataset, assistant_only_loss). Prompt/completion data trains on the completion only (trl's default);
    instruction data becomes prompt/completion, in chat form when the tokenizer has a chat template, so the model is
    tuned in the format it will be prompted with and the loss is on the response alone.
    """
    kind = record_format(dataset.column_names)
    chat_template = getattr(tokenizer, "chat_template", None)
    if kind == "messages":
        if not chat_template:
            raise ValueError('the data set has chat "messages" but the tokenizer has no chat template to render them')
        # Loss on the assistant's turns only where the template marks them ({% generation %}); otherwise trl cannot
        # find them, and the whole conversation is trained on.
        assistant_only = re.search(r"{%-?\s*generation\s*-?%}", chat_template) is not None
        return dataset.select_columns(["messages"]), assistant_only
    if kind == "prompt_completion":
        return dataset.select_columns(["prompt", "completion"]), False
    if kind == "text":
        return dataset.select_columns(["text"]), False

    response_column = "response" if "response" in dataset.column_names else "output"
    has_input = "input" in dataset.column_names

    def convert(record: dict) -> dict:
        instruction = record["instruction"]
        if has_input and record["input"]:
            instruction = f"{instruction}\n\n{record['input']}"
        if chat_template:
            return {"prompt": [{"role": "user", "content": instruction}],
                    "completion": [{"role": "assistant", "content": record[response_column]}]}
        return {"prompt": f"{instruction}\n", "completion": record[response_column]}

    return dataset.map(convert, remove_columns=dataset.column_names), False
