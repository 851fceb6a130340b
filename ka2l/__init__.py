"""ka2l: find where a language model's knowledge ends (KA2L, Stage 1 and onwards).

Importing this package has no side effects: no device probing, no disk or network access.
The public entry points live in submodules (``ka2l.pipeline``, ``ka2l.pool``, ``ka2l.llm``...).
"""

__version__ = "0.1.0"
