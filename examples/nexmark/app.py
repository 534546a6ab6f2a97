"""Every Nexmark query over 100,000 events, results in /tmp/nexmark/<query>.jsonl.

32 PE instances: two workers of 16 slots (the default) hold them.

mkdir -p /tmp/nexmark
streamctl submit examples/nexmark/app.py --include examples/nexmark
"""

import sys
from pathlib import Path

try:
    from nexmark.queries import build
except ImportError:  # on the client, run from the checkout: the package is beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from nexmark.queries import build

app = build("nexmark", "/tmp/nexmark", 100_000)
