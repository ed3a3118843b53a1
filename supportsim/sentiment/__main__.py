"""`python -m supportsim.sentiment train|prepare|evaluate|score`: the sentiment model's commands."""

import sys

from supportsim.sentiment.model import main

sys.exit(main())
