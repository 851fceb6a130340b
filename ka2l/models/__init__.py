"""Language models: loading (hub id, folder, GGUF, the embedded SmolLM2), prompts, hidden states and sampling."""
