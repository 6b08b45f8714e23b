"""callbot.engine.model: PersonaPlex-7B (Moshi architecture) in MLX, fed 24 kHz PCM 80 ms at a time.

Blocks (`conv`, `seanet`, `transformer`, `quantizer`), assembled networks (`mimi`, `lm`, `lm_config`),
loading (`weights`, `ptfile`, `tokenizer`, `voices`, `loudness`), prompting (`prompt`), sampling,
`session` (a loaded `Model`, prepared prompts and per-call sessions) and `persona_swap` (when a live
persona change takes effect). Importing this loads MLX.
"""
