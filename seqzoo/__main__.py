"""``python -m seqzoo``: the same as the ``seqzoo`` command."""

from __future__ import annotations

import sys

from seqzoo.cli import main

if __name__ == "__main__":
    sys.exit(main())
