"""The stage engine, which knows no stage, no report and no Prefect.

`stage` (the contract a stage author implements and its records), `run` (planning and running
shards with item reuse, publishing), `manifest` (fingerprints and what downstream builds on),
`store` (the workdir and the one atomic-write path), `runs` (runs of several stages, run records,
workdir status), `settings` (config sections and their runtime-only keys), `progress`.
It imports nothing from `tasks/` outside itself.
"""
