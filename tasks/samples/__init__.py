"""Built-in data for demos and checks: the sample videos (`videos`, what `lvr run` uses without a
source) and the synthetic verifiable QA set (`synth`, `lvr synth`)."""
