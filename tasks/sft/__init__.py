"""Chain-of-thought SFT with multi-modal sequence parallelism.

`stage.SFTStage` (the DAG stage) launches `trainer` under torchrun; `data` turns the filter
stage's SFT split into model inputs; the step loop, schedule and checkpoints are `tasks.training`'s.
"""
