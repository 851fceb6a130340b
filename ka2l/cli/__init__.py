"""``python -m ka2l`` / ``ka2l``: one module per stage, over the same library calls the app uses."""
