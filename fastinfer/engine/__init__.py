"""The synchronous step loop (``LLMEngine``) and incremental detokenization."""
