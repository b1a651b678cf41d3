"""The ``sinklens`` commands, one module each.

A command module has a docstring (its ``--help`` description), ``HELP`` (its line in ``sinklens --help``),
``add_arguments(parser)`` (its options, checked without importing torch, with defaults taken from the
library's names) and ``run(args)`` (build the :class:`~sinklens.settings.Settings`, call one library function,
print or write). :mod:`sinklens.cli` finds every module of this package whose name does not start with an
underscore and makes it the command of that name (``sink_layer`` -> ``sinklens sink-layer``): adding a
command is adding its module.
"""
