"""Step 3 of the flow: one module per analysis, each returning one result type.

Every result holds tensors and has ``to_frame()``, ``plot()`` (a plotly figure) and ``summary()``.
"""
