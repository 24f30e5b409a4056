"""``python -m atlasmap.cli ...``: the ``atlasmap`` command."""

import sys

from atlasmap.cli import main

sys.exit(main())
