"""Chain-of-thought SFT with multi-modal sequence parallelism (issue 6).

`stage.SFTStage` (the DAG stage) launches `trainer` under torchrun; `data` turns the filter
stage's SFT split into model inputs; `schedule` and `checkpoints` make training resumable.
"""
