"""Meeting the ecosystem: HuggingFace checkpoints in and out (`hf`)."""
