"""Tiny families for tests and benchmarks, built offline: random full models
(``families``), GGUF files (``gguf``) and LoRA adapter families (``lora``)."""
