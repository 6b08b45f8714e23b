"""callbot.engine.serving: calls served by an engine (callbot.engine.contract): the call audio between
media port and model, the echo line, the inference runner (MLX, imported only where it runs) and the
inference process that keeps MLX out of the SIP process."""
