"""`python -m sparseswaps` (and `torchrun -m sparseswaps`) runs the console script."""
import sys

from .cli import main

sys.exit(main())
