"""callbot.sip: the SIP/RTP endpoint (pjsua2) that carries phone calls into engine sessions."""
