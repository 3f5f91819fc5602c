"""``python -m gptoss_jax.finetune``: see :mod:`gptoss_jax.cli.finetune`."""

import sys

from gptoss_jax.cli.finetune import main

if __name__ == "__main__":
    sys.exit(main())
