"""GPU workers: RadVLM analyses complete studies; results are stored for delivery and chat."""
