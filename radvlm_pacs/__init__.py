"""The ``radvlm-pacs`` command line, and the composition root: the only place that wires every part (the DICOM
node, the workers, the API, training) together from the settings. ``composition`` builds and runs the
long-running processes, ``admin`` works on what is stored, ``checks`` tells whether an installation works, and
``cli`` parses the command line and runs the command chosen."""

from radvlm_pacs.cli import main

__all__ = ["main"]
