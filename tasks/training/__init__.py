"""What the training stages share: the stage base, launch and run result (`stage`), local staging
mirrored to object storage (`staging`), the model cache (`models`), the step loop (`loop`),
checkpoints (`checkpoints`), the data schedule (`schedule`) and the other nodes (`nodes`)."""
