"""`python -m rejoinder.agent.cli`: the same as the `rejoinder` command."""
import sys

from . import main

sys.exit(main())
