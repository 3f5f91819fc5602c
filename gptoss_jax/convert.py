"""``python -m gptoss_jax.convert``: see :mod:`gptoss_jax.cli.convert`."""

import sys

from gptoss_jax.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
