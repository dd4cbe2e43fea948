"""The QA stage: reasoning-LLM questions over all captions of a video, then refined reasoning.

`stage` (the Stage), `backends` (LLM behind an answer cache, or the offline template), `prompts`
and `prompts/` (versioned templates), `parser` (R1 answers to validated items), `refine` (the
training target), `template` (the offline generator), `cache` (answers on disk), `captions`.
"""
