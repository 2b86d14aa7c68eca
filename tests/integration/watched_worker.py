"""The real worker, recording every file it opens under a watched folder: how a test sees that a
refused job touched nothing. A Python audit hook sees each open() the worker's code makes (the
model checks, hashing and header reads all come before llama.cpp is handed a path).

Run as `python tests/integration/watched_worker.py --name NAME` with TF_TEST_WATCHED_DIR and
TF_TEST_OPENS_LOG set (test-only; never shipped).
"""

import os
import sys

WATCHED = os.environ["TF_TEST_WATCHED_DIR"]
_log = open(os.environ["TF_TEST_OPENS_LOG"], "a", buffering=1)


def _record_opens(event: str, args: tuple) -> None:
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if path.startswith(WATCHED):
            _log.write(path + "\n")


sys.addaudithook(_record_opens)

from worker.__main__ import main  # noqa: E402  (after the hook, so no open escapes it)

sys.exit(main(sys.argv[1:]))
