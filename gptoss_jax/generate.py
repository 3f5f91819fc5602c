"""``python -m gptoss_jax.generate``: see :mod:`gptoss_jax.cli.generate`."""

import sys

from gptoss_jax.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
