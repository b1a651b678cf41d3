"""Studies: analyses composed of the primitives in :mod:`sinklens.analyses`, each starting from one measured
circuit setup (:mod:`sinklens.studies.setup`): the paper's Table-1 row, the first-layer circuit, the vocabulary
scan (and its storage) and the cluster attack."""
