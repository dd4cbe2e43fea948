"""Questions and answers: the training prompt format and the question taxonomy (`prompts`), answer
extraction and rewards (`answers`), difficulty from pass rates (`difficulty`), the LLM judge (`judge`)."""
