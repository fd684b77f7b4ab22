"""``python -m nnunetv2_mobilevim.cli``: the same as the ``nnunetv2_mobilevim`` command."""

import sys

from .main import main

sys.exit(main())
