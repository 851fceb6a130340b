"""Stage 3b: fine-tuning the probed model on the answered unknowns, and what it bought.

    data         (question, answer) pairs from Label Studio, the pool's gold answers or a file; a held-out
                 eval split training never sees; optionally k known questions with the model's own answers
    preflight    memory estimate (weights, LoRA, optimizer, activations) against the device; refuses what cannot fit
    lora         the LoRA fine-tune as resumable work (the only peft / trl importer) and ``load_tuned``

Importing this package loads nothing heavy; import the modules.
"""
