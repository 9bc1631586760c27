"""``python -m deformconv``: the same as the ``deformconv`` command."""

import sys

from deformconv.cli import main

sys.exit(main())
