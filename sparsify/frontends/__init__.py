"""Per-family help for capture: example inputs, call defaults, saving model code-free.

Frontends know how to *build inputs for* and *save/rebuild* a model family;
routing never depends on them.
"""
