"""Step 2 of the flow: run a model on token-level inputs, with named hooks and interventions.

``tokens`` builds the inputs, ``cache`` is the one way to run a model (a ``names_filter``, stopping
after the last block needed), ``interventions`` holds the hook functions that ablate neurons.
"""
