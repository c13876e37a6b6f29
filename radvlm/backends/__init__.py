"""Model backends: one interface, so prompts and parsing give the same answer on every backend."""

from __future__ import annotations

from radvlm.backends.base import ModelBackend
from records.settings import ModelSettings


def load_backend(model: ModelSettings) -> ModelBackend:
    """The configured backend. ``scripted`` is the named test double and says so in every result."""
    if model.backend == "scripted":
        from radvlm.backends.scripted import ScriptedBackend

        return ScriptedBackend(delay_s=model.scripted_delay_s)
    if model.backend == "openai-server":
        from radvlm.backends.openai_server import OpenAIServerBackend

        key = model.server_api_key.get_secret_value() if model.server_api_key else None
        return OpenAIServerBackend(model.server_url or "", model.server_model or model.id, api_key=key,
                                   revision=model.revision, timeout_s=model.server_timeout_s)
    from radvlm.backends.transformers import TransformersBackend

    return TransformersBackend(model.id, revision=model.revision, device=model.device,
                               quantization=model.quantization, prefix_cache_mb=model.prefix_cache_mb,
                               batch_cache_mb=model.batch_cache_mb, max_prompt_tokens=model.max_prompt_tokens,
                               max_new_tokens=model.max_new_tokens, compile_decode=model.compile_decode,
                               prefill_chunk_tokens=model.prefill_chunk_tokens)
