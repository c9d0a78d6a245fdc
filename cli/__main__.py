"""``python -m cavmae.cli``: the same as the ``cavmae`` console script (useful under torchrun)."""

from .main import main

main()
