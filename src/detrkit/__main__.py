"""``python -m detrkit`` (also what ``torchrun -m detrkit`` runs)."""
import sys

from detrkit.cli import main

sys.exit(main())
