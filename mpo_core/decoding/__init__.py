"""The math of one decode step, on log-probs the runners return: ``mixing`` (the
log-linear blend), ``sampling``, ``grammar`` masks, ``prompt_logprobs``, and speculative
decoding (``drafts`` propose, ``speculator`` decides who drafts, ``acceptance`` keeps the
output exactly the mixture's)."""
