#!/usr/bin/env python
"""Build the crafted-tree corpus of issue 16 (tests/crafted.py) into OUTDIR, for a look or a manual run.

    python scripts/make_crafted.py OUTDIR [CASE ...]

Every case is OUTDIR/<case>/{tree,outside,pair}; OUTDIR/corpus.json lists the cases, their expected findings
and the secret token the files outside the trees hold.  Nothing here is run; see tests/test_untrusted.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.crafted import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
