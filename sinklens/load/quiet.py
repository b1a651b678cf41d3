"""The loading libraries' progress bars and notices, hidden while sinklens loads a model (``verbose=True`` shows
them): the command line prints its own one-line notes instead."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def libraries_quiet(quiet: bool) -> Iterator[None]:
    """Hide transformers' and huggingface_hub's progress bars and notices for the duration."""
    if not quiet:
        yield
        return
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from transformers import modeling_gguf_pytorch_utils as gguf_reader
    from transformers.utils import logging as hf_logging

    bars_on, hub_bars_off, level = (
        hf_logging.is_progress_bar_enabled(),
        are_progress_bars_disabled(),
        hf_logging.get_verbosity(),
    )
    gguf_bar = gguf_reader.tqdm  # the GGUF reader's bar ignores transformers' own switch
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    hf_logging.set_verbosity_error()
    gguf_reader.tqdm = functools.partial(gguf_bar, disable=True)
    try:
        yield
    finally:
        gguf_reader.tqdm = gguf_bar
        hf_logging.set_verbosity(level)
        if bars_on:
            hf_logging.enable_progress_bar()
        if not hub_bars_off:
            enable_progress_bars()
