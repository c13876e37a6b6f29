"""Rebuild RadVLM: its instruction data set, its fine-tuning recipe and its evaluation."""

#: ``radvlm-pacs train``'s help, here so that the command line can list it without importing ``training.cli``
COMMAND_HELP = "RadVLM's instruction data, fine-tuning and evaluation"
