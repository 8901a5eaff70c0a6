"""Imported at start-up by the `transformers serve` processes that tests/test_remote.py starts (this
folder is put on their PYTHONPATH): logs each generation the server cancels because its client went
away, and how many tokens it had made, so that a test can see the server stop rather than guess."""

import sys

try:
    from transformers.cli.serving import utils as _serving
except Exception:  # not a serving process, or another transformers: leave it alone
    _serving = None

if _serving is not None and hasattr(_serving, "DirectStreamer"):
    _cancel = _serving.DirectStreamer.cancel

    def _logged_cancel(self):
        print(f"test-hook: generation cancelled after {self.total_tokens} tokens", file=sys.stderr, flush=True)
        _cancel(self)

    _serving.DirectStreamer.cancel = _logged_cancel
