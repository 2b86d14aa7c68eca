"""The project's prompt sets (farm/data/prompts/<category>.jsonl): what speculation decodes, and
what the memory estimate sizes a technique job's context by. Text only; no tokenizer.
"""

from __future__ import annotations

import json
from importlib import resources

from farm.contract import PROMPT_CATEGORIES


def load_prompts(category: str, n: int = 0) -> list[str]:
    """The first n prompts (0: all) of a category from farm/data/prompts/<category>.jsonl."""
    if category not in PROMPT_CATEGORIES:
        raise ValueError(f"unknown prompt category {category!r}; known: {', '.join(PROMPT_CATEGORIES)}")
    text = resources.files("farm").joinpath(f"data/prompts/{category}.jsonl").read_text(encoding="utf-8")
    prompts = [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
    return prompts[:n] if n else prompts
