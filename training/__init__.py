"""Rebuild RadVLM: its instruction data set, its fine-tuning recipe and its evaluation."""
