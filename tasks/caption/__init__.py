"""Caption stage: one VLM caption per clip."""
