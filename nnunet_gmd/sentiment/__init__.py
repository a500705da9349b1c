"""Sentiment companion: CMU-MOSI / CMU-MOSEI regression with the same Dynamic Sharing + GMD core.

Three modalities (text, audio, vision), named L, A, V in reports as in the multimodal sentiment literature.
See ``docs/sentiment.md`` for the file formats and commands.
"""
from __future__ import annotations

MODALITIES: tuple[str, ...] = ("text", "audio", "vision")
SHORT_NAMES: tuple[str, ...] = ("L", "A", "V")
