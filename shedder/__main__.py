"""``python -m shedder``: see ``shedder.cli``."""
import sys

from .cli import main

sys.exit(main())
