"""The join code: everything a new worker box needs, in one line a home-labber pastes.

`tokenfarm workers add NAME` prints `tokenfarm worker join <code>` (or `python -m worker join
<code>` on a box with only the worker installed); the code is `tfjoin1.` and the base64url of a
small JSON object: the worker's name, the broker address, its result-signing token and the
orchestrator's public key for jobs. `join` turns it into an env file of TOKENFARM_* settings
(0600: the token is a secret) and starts the worker from it.

Owns the code's format and the env file's. Knows nothing of the database or of how the
orchestrator issues what goes in; a code carries secrets, so it is printed once and never logged.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PREFIX = "tfjoin1."


class JoinError(ValueError):
    pass


class JoinCode(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    broker_url: str = Field(min_length=1)
    worker_token: str = Field(min_length=1)
    jobs_public_key: str = Field(min_length=1)
    # The worker's own broker user (issue 18 part 2: a Redis ACL user per worker). Empty while
    # every worker shares the broker URL's credentials; set, they replace the URL's user and password.
    broker_username: str = ""
    broker_password: str = ""
    # A confined farm (orchestrator/brokerusers.py): the worker keeps its keys under its own prefix.
    confined: bool = False
    # The CA that signed the broker's TLS certificate (PEM), for rediss:// brokers; written beside
    # the env file, so the one line is all a box needs.
    ca_pem: str = Field(default="", max_length=16384)

    def encode(self) -> str:
        data = json.dumps(self.model_dump(exclude_defaults=True), separators=(",", ":"), sort_keys=True)
        return PREFIX + base64.urlsafe_b64encode(data.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, code: str) -> "JoinCode":
        code = code.strip()
        fix = "copy the whole line `tokenfarm workers add NAME` printed, or ask the farm's operator for a new one"
        if not code.startswith(PREFIX):
            raise JoinError(f"not a tokenfarm join code (it starts with {PREFIX!r}): {fix}")
        body = code[len(PREFIX):]
        try:
            data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            return cls.model_validate(data)
        except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
            detail = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else "it is cut short or changed"
            raise JoinError(f"the join code cannot be read ({detail}): {fix}") from None

    def effective_broker_url(self) -> str:
        if not self.broker_username:
            return self.broker_url
        from urllib.parse import quote, urlsplit, urlunsplit

        parts = urlsplit(self.broker_url)
        host = parts.netloc.rsplit("@", 1)[-1]
        credentials = f"{quote(self.broker_username, safe='')}:{quote(self.broker_password, safe='')}@"
        return urlunsplit(parts._replace(netloc=credentials + host))

    def env(self, ca_file: Path | None = None) -> dict[str, str]:
        env = {"TOKENFARM_WORKER_NAME": self.name, "TOKENFARM_BROKER_URL": self.effective_broker_url(),
               "TOKENFARM_WORKER_TOKEN": self.worker_token, "TOKENFARM_JOBS_PUBLIC_KEY": self.jobs_public_key}
        if self.confined:
            env["TOKENFARM_BROKER_CONFINED"] = "1"
        if ca_file is not None and self.ca_pem:
            env["TOKENFARM_BROKER_CA_FILE"] = str(ca_file)
        return env


def write_env_file(path: Path, env: dict[str, str]) -> None:
    """KEY=VALUE lines, as docker compose's env_file and systemd's EnvironmentFile read them;
    created 0600 (it holds the worker's token), replacing any earlier file whole."""
    for key, value in env.items():
        if "\n" in value or "\r" in value:
            raise JoinError(f"{key} holds a line break and cannot go in an env file")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{key}={value}\n" for key, value in env.items()))
    os.replace(tmp, path)


def read_env_file(path: Path) -> dict[str, str]:
    """The settings an env file written by `join` holds (blank lines and # comments skipped)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise JoinError(f"cannot read the env file {path}: {exc.strerror}; run `python -m worker join <code>` first")
    env = {}
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.startswith("TOKENFARM_"):
            raise JoinError(f"{path}:{n}: expected TOKENFARM_NAME=value")
        env[key.strip()] = value.strip()
    return env
