"""callbot.app: the product composed from its parts: the `callbot` command, serve, settings, bots, model
setup, recording, metrics, the event log and the event bus. The only package that imports both
callbot.sip and callbot.engine."""
