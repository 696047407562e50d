"""A target whose import takes SG_SLOW_IMPORT seconds (the fork server's handshake waits
for it), then handles messages like the recorder."""

from __future__ import annotations

import os
import time

from tests.apps.recorder import handle  # noqa: F401  (the target's handler)

time.sleep(float(os.environ.get("SG_SLOW_IMPORT", "0")))
