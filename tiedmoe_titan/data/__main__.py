"""``python -m tiedmoe_titan.data`` is ``tiedmoe-data``."""

import sys

from .cli import main

sys.exit(main())
