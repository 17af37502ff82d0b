"""``python -m pyherd_worker``: run one worker on the host's pipes (fd 3 in, fd 4 out)."""

import sys

from .runtime import main

sys.exit(main())
