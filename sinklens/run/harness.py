"""The patched model inside lm-evaluation-harness: a model type ``sinklens`` and its own command line.

lm-evaluation-harness finds model types in its registry and has no plugin discovery, so this module
registers ``sinklens`` (an ``HFLM`` that loads a model through sinklens, so aliases, GGUF files and
the offline cache all work, and installs a patch file as forward hooks) and then hands the
command line to the harness unchanged::

    python -m sinklens.run.harness run --model sinklens \\
        --model_args pretrained=smollm2-135m-instruct,patch=patch.json --tasks arc_easy --device cpu

Without ``patch=`` it is the original model, so the two runs differ only by the patch.
Needs ``pip install 'sinklens[harness]'`` (lm_eval 0.4.13).
"""

from __future__ import annotations

from sinklens.errors import SinklensError

MODEL_TYPE = "sinklens"


def _require_harness():
    try:
        from lm_eval.api.registry import model_registry, register_model
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise SinklensError(
            "lm-evaluation-harness is not installed",
            "pip install 'sinklens[harness]' (lm_eval 0.4.13)",
        ) from None
    return HFLM, register_model, model_registry


def harness_model(pretrained: str, patch: str | None = None, **kwargs):
    """An lm-evaluation-harness model of ``pretrained`` (any sinklens model spec) with the patch file
    ``patch`` installed; ``kwargs`` go to the harness's ``HFLM`` (batch_size, device, ...)."""
    register()
    from lm_eval.api.registry import get_model

    return get_model(MODEL_TYPE)(pretrained=pretrained, patch=patch, **kwargs)


def register() -> None:
    """Register the ``sinklens`` model type with lm-evaluation-harness (once)."""
    _, register_model, model_registry = _require_harness()
    if MODEL_TYPE in model_registry:
        return
    # imported by name (not taken from _require_harness's tuple) so that it is a valid base class
    from lm_eval.models.huggingface import HFLM

    @register_model(MODEL_TYPE)
    class SinklensLM(HFLM):
        """``HFLM`` on a model loaded by sinklens, with a sinklens patch file installed as forward hooks."""

        def __init__(
            self, pretrained: str, patch: str | None = None, device: str | None = None, **kwargs
        ):
            from sinklens.load.models import load_hf_model
            from sinklens.run.sink_patch import SinkPatch

            model, tokenizer = load_hf_model(pretrained, device=device)
            self.sink_patch = SinkPatch.load(patch) if patch else None
            if self.sink_patch is not None:
                self.sink_patch.check(
                    model.config.num_hidden_layers, model.config.intermediate_size, pretrained
                )
                self.sink_patch.install(model)
            super().__init__(
                pretrained=model, tokenizer=tokenizer, device=device or str(model.device), **kwargs
            )


def main() -> None:
    """``lm_eval``'s own command line, with the ``sinklens`` model type registered."""
    register()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
