"""`python -m phi3v.cli ...` = `phi3v ...`."""

import sys

from . import main

sys.exit(main())
