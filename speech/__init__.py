"""Speech beside the model: text to speech for flow prompts (`say`) and a recognizer for the caller's leg.

Both run offline by default with what installs from Debian/Homebrew or PyPI (espeak-ng; pocketsphinx,
whose en-us model ships inside its wheel), and take better engines where the user supplies a model.
Nothing here imports the engine's model, the SIP side or the app.
"""
