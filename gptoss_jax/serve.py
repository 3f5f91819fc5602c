"""``python -m gptoss_jax.serve``: see :mod:`gptoss_jax.cli.serve`."""

import sys

from gptoss_jax.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
