"""Client tests: make ``optserve_client`` importable from a plain checkout.

The client is its own distribution (``clients/python``); when it is not installed
(``pip install -e clients/python``) the tests import it from the source tree.
"""

from __future__ import annotations

import sys
from pathlib import Path

CLIENT_SRC = Path(__file__).resolve().parents[2] / "clients" / "python"

try:
    import optserve_client  # noqa: F401
except ImportError:
    sys.path.insert(0, str(CLIENT_SRC))
