"""``python -m ocd``."""
from .cli import main

main()
