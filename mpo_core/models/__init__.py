"""Models and their memory: loading a family (``policies``; weights from hub ids, folders
or GGUF files, ``sources``), LoRA adapters (``adapters``, ``lora``), personas, soups, the
KV caches (``kvcache``, ``static_cache``, ``prefix_cache``) and their budget, and CPU
kernels (``cpu_linear``)."""
