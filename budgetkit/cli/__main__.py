"""``python -m budgetkit.cli``: the same as the ``budgetkit`` command."""

import sys

from ._main import main

sys.exit(main())
