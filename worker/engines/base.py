"""The Backend protocol: what the measurement core may ask of an engine.

Every call returns only when the device is idle, so a timer read right after it measures the
work and nothing else. Greedy next tokens come back from prefill and decode because the
techniques built on top (speculation, MTP) and the losslessness checks need them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

from farm.contract import EngineConfig

if TYPE_CHECKING:  # numpy only for the annotation: the protocol stays importable without it
    import numpy as np


class EngineError(Exception):
    """The engine could not do what was asked; the message names the problem and the fix."""


class Backend(Protocol):
    name: str

    def load(self, path: Path, config: EngineConfig, n_ctx: int) -> None:
        """Load weights and create a context holding at least n_ctx tokens."""

    @property
    def n_vocab(self) -> int: ...

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]: ...

    def reset(self) -> None:
        """Empty the KV cache: the next prefill starts at position 0."""

    def prefill(self, tokens: Sequence[int]) -> int:
        """Append tokens to the KV cache; return the greedy next token."""

    def decode(self, token: int) -> int:
        """Append one token; return the greedy next token."""

    # Optional: feed(token) -> None appends one token and returns when the device is idle,
    # reading nothing back; the measurement core uses it for timed steps whose tokens an earlier
    # repetition produced (worker/measure.py), and decode where an engine lacks it.

    def chunk_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits (T, V), float32, after every position of tokens, evaluated from an empty cache
        (the quality pass, worker/quality.py); the cache is left empty."""

    def conditions(self) -> dict:
        """Settings the loaded context really uses: n_threads, kv_type and engine flags."""

    def versions(self) -> dict[str, str]:
        """Engine build identifiers recorded with every Result."""

    def close(self) -> None: ...


class SpeculativeBackend(Backend, Protocol):
    """What draft-and-verify decoding needs on top of plain greedy decoding."""

    @property
    def n_past(self) -> int:
        """Tokens in the KV cache."""

    def verify(self, tokens: Sequence[int]) -> list[int]:
        """Append tokens in one pass; return the greedy next token after each of them."""

    def truncate(self, n_past: int) -> None:
        """Forget the KV entries at positions >= n_past."""

    def top_prob(self) -> float:
        """Probability of the greedy token after the last appended position."""

    def token_texts(self) -> list[bytes]:
        """Every token's text, by id."""

    def chat_prompt(self, user_text: str) -> str:
        """user_text as one user turn in the model's chat template."""

    # Optional capabilities, asked for with hasattr by the drafter or sampler that needs them
    # (worker/speculative.py), so an engine without them refuses the technique, not the job kind:
    #   probs(temperature) -> tensor (T, V): sampling distributions after each position of the
    #       last pass (sampled decoding and acceptance);
    #   last_hidden() -> tensor (T, E): final hidden states of the last pass's positions;
    #   mtp_context(n_mtp, base_sha256) -> the running state of MTP heads trained for the loaded
    #       model (start, add_hidden, propose), fed with last_hidden.
