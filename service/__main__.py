"""``python -m service serve ...``: the same as the ``optserve`` command."""

import sys

from service.cli import main

sys.exit(main())
