"""`python -m verifier …` (also installed as `pag-verify`; `--version` prints the version)."""

import sys

from verifier.cli import main

sys.exit(main())
