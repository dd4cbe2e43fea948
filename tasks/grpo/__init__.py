"""GRPO with multi-modal reinforcement sequence parallelism (MR-SP).

`stage.GRPOStage` (the DAG stage) launches `trainer` under torchrun, as the SFT stage does;
`core_algos` is the math of Eq. 1 and 2 as pure functions; MR-SP stage 1 (each video encoded once,
frames split over the SP group, an on-disk cache across steps and runs) is
`parallel.embedding_cache`; `prefill` is MR-SP stage 2 (sequence-parallel log-probs from the cached
embeddings); `rollout` holds the rollout engines (hf, vllm); `data` maps the filter stage's rl
split to examples; `report` writes the stage's report with the reward curve.
"""
