"""One module per web framework, each a thin shell around the core in ``perspective_asgi``.

Import the adapter you need; each imports its framework, which is an optional extra.
"""
