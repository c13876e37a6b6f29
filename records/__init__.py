"""The shared core every part may use: settings, tables, sessions and migrations, the study's stored files and
their pixels, the finding labels, audit, metrics, logs, clocks and periodic threads. It imports no other part."""
