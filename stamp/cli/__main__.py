"""`python -m stamp.cli` (what `torchrun -m stamp.cli ...` runs)."""
from stamp.cli import app

app()
