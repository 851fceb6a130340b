"""ka2l: find where a language model's knowledge ends (KA2L, Stage 1 and onwards).

Importing this package has no side effects: no device probing, no disk or network access.
The package follows the method: ``ka2l.probing`` (Stage 1), ``ka2l.augment`` (Stage 2), over ``ka2l.models``,
``ka2l.pools`` and ``ka2l.store``; ``ka2l.views``, ``ka2l.cli`` and ``ka2l.ui`` sit on top. README.md draws the tree.
"""

__version__ = "0.1.0"
