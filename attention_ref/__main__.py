"""``python -m attention_ref <command>``: the command line lives in :mod:`attention_ref.cli`."""

import sys

from .cli import main

sys.exit(main())
