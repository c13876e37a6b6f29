"""``python -m radvlm_pacs``: the ``radvlm-pacs`` command, for where its script is not on the PATH."""

import sys

from radvlm_pacs.cli import main

sys.exit(main())
