"""`python -m medpruner ...` is the same as the `medpruner` command."""
import sys

from .cli import main

sys.exit(main())
