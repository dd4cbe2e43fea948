"""Clip stage: probe each source video and cut it into ~10 s clips with true boundaries."""
