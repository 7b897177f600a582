"""``python -m shedder``: see ``shedder.cli``."""
import sys

from shedder.cli import main

sys.exit(main())
