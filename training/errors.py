"""What a ``radvlm-pacs train`` command refuses: an input the user can fix.

Each is one line naming the file, the column, the part, the endpoint or the checkpoint and why;
the command prints it and exits with status 2, having written nothing at its ``--out``.
"""

from __future__ import annotations


class Refused(Exception):
    """An input the command cannot use (a folder, a table, an image, a flag, an endpoint, a checkpoint)."""
