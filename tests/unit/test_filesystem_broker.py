"""The embedded broker publishes each message whole: a consumer never finds a half-written one."""

from __future__ import annotations

import os

from farm import broker
from farm.settings import Settings


def test_a_message_appears_only_once_written_in_full(tmp_path, monkeypatch):
    settings = Settings(data_dir=tmp_path)  # the embedded default
    app = broker.create_app(settings)
    folder = settings.broker_dir / "queue"
    seen_at_rename = []
    real_replace = os.replace

    def replace(src, dst):
        # At the moment of publication the consumer's view holds no message yet, and what is
        # about to appear is already complete.
        seen_at_rename.append([n for n in os.listdir(folder) if n.partition(".")[2] == "q.msg"])
        with open(src, "rb") as f:
            assert f.read().endswith(b"}")
        real_replace(src, dst)

    monkeypatch.setattr(broker.os, "replace", replace)
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        assert isinstance(channel, broker._FilesystemChannel)
        channel._put("q", {"body": "x" * 100_000, "n": 1})
        assert seen_at_rename == [[]]
        assert [n.partition(".")[2] for n in os.listdir(folder)] == ["q.msg"]
        assert channel._get("q") == {"body": "x" * 100_000, "n": 1}
