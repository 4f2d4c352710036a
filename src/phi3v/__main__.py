"""`python -m phi3v ...` = `phi3v ...`."""

import sys

from .cli import main

sys.exit(main())
