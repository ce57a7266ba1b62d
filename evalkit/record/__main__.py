"""`python -m evalkit.record --schema [--write]`: print (or write) the run record's JSON Schema."""
import sys

from evalkit.record import main

sys.exit(main())
