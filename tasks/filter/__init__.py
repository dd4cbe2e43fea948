"""Filter stage: the base model answers every question `filter.runs` times; difficulty labels, splits, exports.

`stage` (the Stage), `rollouts` (the samplers), `labels` (difficulty, SFT quality, splits),
`exports` (files for other trainers), `report`.
"""
