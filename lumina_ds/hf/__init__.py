"""The Hugging Face boundary: config.json and checkpoint tensors to and from lumina-ds, exactly or not at all."""
