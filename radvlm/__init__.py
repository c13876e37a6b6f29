"""RadVLM itself, as every part that talks to it needs it: its prompts word for word, the reading of its
answers into labels and boxes, and the backends that run it (transformers, an OpenAI-compatible server, a
scripted stand-in for tests). The worker analyses with it; training builds its instructions from the same
prompts and evaluates through the same backends."""
