import sys

from cks_jax.cli import main

sys.exit(main())
