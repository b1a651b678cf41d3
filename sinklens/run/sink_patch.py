"""The sink-neuron patch: clamp the sink neurons on every position after the first, at inference time.

Paper (Yona et al. 2025, Listing 1): at the sink layer's up-projection output, every position after
the first takes the value the first token after the start had; the first position is never
touched, so the genuine sink survives, and a repeated token can no longer drive the neurons up. A
:class:`SinkPatch` names the neurons (``(layer, index)`` pairs, so a sink built over several layers
is patched in each), the hook point (``"up"``: the up-projection output,
TransformerLens ``mlp.hook_pre_linear``, the paper's; ``"gate"``: the gate pre-activation
``mlp.hook_pre``; ``"post"``: the neuron's activation after the gate ``mlp.hook_post``) and the
value (``"first_after_start"``, the paper's; or ``"calibrated"``: a fixed value per neuron, its mean
over natural text).

It installs in two ways, with the same arithmetic:

* on a ``TransformerBridge`` as a forward hook on the TransformerLens hook point, so caches taken
  while it is installed show the clamped values;
* on a plain Hugging Face model as a forward hook on the module that computes the activation
  (``mlp.up_proj`` / ``mlp.gate_proj`` output, ``mlp.down_proj`` input), so ``model.generate``,
  lm-evaluation-harness or a server use it without TransformerLens.

Positions are read from the decoder's own inputs (``position_ids``, else the attention mask and the
cache length), so each row is clamped relative to its own first real token under left padding,
and a prefill followed by decode steps with a KV cache gives the values that recomputing without a
cache gives (the first-after-start value is kept per row from the step that saw it). Installing a
patch that is already installed does nothing; installing another replaces it; removing it restores
the model exactly (no weight is ever changed). The per-row values live on the installed patch, so
it is **not thread-safe**: run one forward at a time per patched model (``generate`` and
lm-evaluation-harness do).

A patch saves to a small JSON file that records the model it was found on, and refuses to install
on a model of another shape.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformer_lens.utilities import get_act_name

from sinklens._io import write_json
from sinklens.defaults import PATCH_HOOKS as HOOKS
from sinklens.defaults import PATCH_VALUES as VALUES
from sinklens.errors import SinklensError
from sinklens.load.traced import TracedModel
from sinklens.results import value_type

FORMAT = "sinklens-patch/1"


@value_type
@dataclass(frozen=True)
class SinkPatch:
    """Clamp ``neurons`` (``(layer, index)`` pairs) at ``hook`` on every position after each row's first real token."""

    model: str
    n_layers: int
    d_mlp: int
    neurons: tuple[tuple[int, int], ...]
    hook: str = "up"
    value: str = "first_after_start"
    values: tuple[float, ...] | None = None  # per neuron, for value="calibrated"
    selection: dict[str, Any] = field(
        default_factory=dict, compare=False
    )  # how it was chosen, with the numbers

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "neurons", tuple((int(l), int(n)) for l, n in self.neurons)
        )  # lists from files
        if self.values is not None:
            object.__setattr__(self, "values", tuple(float(v) for v in self.values))
        if self.hook not in HOOKS:
            raise SinklensError(
                f"unknown patch hook {self.hook!r}", f"use one of {', '.join(HOOKS)}"
            )
        if self.value not in VALUES:
            raise SinklensError(
                f"unknown patch value {self.value!r}", f"use one of {', '.join(VALUES)}"
            )
        if not self.neurons:
            raise SinklensError("the patch clamps no neuron", "give at least one sink neuron")
        if any(
            not 0 <= layer < self.n_layers or not 0 <= n < self.d_mlp for layer, n in self.neurons
        ):
            raise SinklensError(
                f"the patch's neurons {[list(n) for n in self.neurons]} are out of range for a model with "
                f"{self.n_layers} layers and d_mlp={self.d_mlp}",
                "use layers below n_layers and neurons below d_mlp",
            )
        if (self.value == "calibrated") != (self.values is not None) or (
            self.values is not None and len(self.values) != len(self.neurons)
        ):
            raise SinklensError(
                "a calibrated patch needs one value per neuron, and only a calibrated one has values",
                "build it with calibrated values, or value='first_after_start' without values",
            )

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.neurons})

    def hook_name(self, layer: int) -> str:
        """The TransformerLens hook point the patch edits in ``layer``."""
        return get_act_name(HOOKS[self.hook], layer)

    def describe(self) -> str:
        what = {
            "up": "up-projection output",
            "gate": "gate pre-activation",
            "post": "activation after the gate",
        }
        value = (
            "the value of the first token after the start"
            if self.value == "first_after_start"
            else "their mean over natural text"
        )
        where = "; ".join(
            f"layer {layer}: {[n for l, n in self.neurons if l == layer]}" for layer in self.layers
        )
        return (
            f"{where}: {what[self.hook]} (mlp.hook_{HOOKS[self.hook]}) clamped to {value} on every position after "
            "the first"
        )

    def check(self, n_layers: int, d_mlp: int | None, name: str = "") -> None:
        """Refuse a model of another shape."""
        if (n_layers, d_mlp) != (self.n_layers, self.d_mlp):
            raise SinklensError(
                f"this patch was found on {self.model} ({self.n_layers} layers, d_mlp={self.d_mlp}) and does not fit "
                f"{name or 'this model'} ({n_layers} layers, d_mlp={d_mlp})",
                "find a patch for this model: sinklens patch --model SPEC --out patch.json",
            )

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["neurons"] = [list(n) for n in self.neurons]
        data["values"] = None if self.values is None else list(self.values)
        return {"format": FORMAT, **data}

    def save(self, path: str | Path) -> None:
        write_json(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> SinkPatch:
        """Read a patch file; a missing, corrupt or foreign file is one clear error."""
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SinklensError(
                f"patch file {path} does not exist",
                "write one with: sinklens patch --model SPEC --out patch.json",
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SinklensError(
                f"patch file {path} is not valid JSON ({exc})",
                "write it again with: sinklens patch --model SPEC --out patch.json",
            ) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SinklensError(
                f'{path} is not a sinklens patch (no "format": "{FORMAT}")',
                "pass a file written by sinklens patch",
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in fields})
        except (KeyError, TypeError, ValueError) as exc:
            raise SinklensError(
                f"patch file {path} is incomplete ({type(exc).__name__}: {exc})",
                "write it again with: sinklens patch --model SPEC --out patch.json",
            ) from None

    def install(self, model: nn.Module) -> InstalledPatch:
        """Install on a ``TransformerBridge`` or a Hugging Face causal LM (see the module docstring). A bridge and
        the Hugging Face model inside it (``bridge.original_model``) share their modules, so they hold one patch
        between them: installing on either replaces what either held. A model on the nnsight backend is refused:
        on NDIF its modules are the server's, shared with its other users (those here are empty stand-ins)."""
        if isinstance(model, TracedModel):
            raise SinklensError(
                f"a patch cannot be installed on {model.cfg.model_name} on the nnsight backend: on NDIF the "
                "server's model is shared, and the modules here are stand-ins",
                "install it on the bridge (load the model without backend='nnsight')",
            )
        weights = _weights(model)
        current = installed_patch(model)
        if current is not None:
            if current.patch == self and current.model is model:
                return current
            current.remove()
        installed = InstalledPatch(self, model)
        # torch types Module.__setattr__ for tensors and modules only
        weights._sinklens_patch = installed  # type: ignore[assignment]
        return installed

    @contextmanager
    def installed(self, model: nn.Module) -> Iterator[InstalledPatch]:
        """``with patch.installed(model): ...`` runs the block with the patch and removes it after."""
        handle = self.install(model)
        try:
            yield handle
        finally:
            handle.remove()


def installed_patch(model: nn.Module) -> InstalledPatch | None:
    """The patch installed on ``model`` (or on the bridge or Hugging Face model sharing its modules), if any."""
    return getattr(_weights(model), "_sinklens_patch", None)


def _weights(model: nn.Module) -> nn.Module:
    """The Hugging Face model that holds ``model``'s modules: itself, or the one a TransformerBridge wraps."""
    return getattr(model, "original_model", model)


def _decoder(model: nn.Module) -> nn.Module:
    hf = _weights(model)
    try:
        # torch's Module.__getattr__ types the method as Tensor | Module
        return hf.get_decoder()  # type: ignore[operator]
    except AttributeError:
        raise SinklensError(
            f"{type(hf).__name__} has no decoder the patch can follow",
            "install the patch on a Hugging Face causal LM or a TransformerBridge",
        ) from None


def _hf_module(model: nn.Module, patch: SinkPatch, layer: int) -> tuple[nn.Module, bool]:
    """The module whose output (``False``) or input (``True``) is the patched activation, on plain HF."""
    layers = getattr(_decoder(model), "layers", None)
    mlp = getattr(layers[layer], "mlp", None) if layers is not None else None
    name = {"up": "up_proj", "gate": "gate_proj", "post": "down_proj"}[patch.hook]
    module = getattr(mlp, name, None)
    if module is None:
        raise SinklensError(
            f"{type(model).__name__} has no mlp.{name} in layer {layer}",
            "the Hugging Face path knows gated MLPs named gate_proj/up_proj/down_proj (Llama, Gemma, "
            "Mistral, Qwen); use the TransformerBridge path for other models",
        )
    return module, patch.hook == "post"


class InstalledPatch:
    """A patch installed on one model; ``remove()`` takes it off."""

    def __init__(self, patch: SinkPatch, model: nn.Module):
        self.patch, self.model = patch, model
        n_layers, d_mlp = _shape(model)
        patch.check(
            n_layers,
            d_mlp,
            getattr(getattr(model, "cfg", None), "model_name", type(model).__name__),
        )
        self.stored: dict[
            int, torch.Tensor
        ] = {}  # layer -> [batch, neuron]: the first-after-start values per row
        self.positions: torch.Tensor | None = (
            None  # [batch, pos] of the forward in progress; -1: padding
        )
        self.handles = [_decoder(model).register_forward_pre_hook(self._track, with_kwargs=True)]
        for layer in patch.layers:
            clamp = functools.partial(self._clamp, layer)
            hook_dict = getattr(model, "hook_dict", None)
            if hook_dict is not None:  # a TransformerBridge: the TransformerLens hook point
                point = hook_dict[patch.hook_name(layer)]
                self.handles.append(
                    point.register_forward_hook(lambda module, args, out, c=clamp: c(out))
                )
                continue
            module, is_input = _hf_module(model, patch, layer)
            if is_input:
                self.handles.append(
                    module.register_forward_pre_hook(
                        lambda m, args, c=clamp: (c(args[0]), *args[1:])
                    )
                )
            else:
                self.handles.append(
                    module.register_forward_hook(lambda m, args, out, c=clamp: c(out))
                )

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if installed_patch(self.model) is self:
            del _weights(self.model)._sinklens_patch

    def _track(self, module, args, kwargs) -> None:
        """Read each row's position of every token in this forward, relative to its first real token."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        batch, length = ids.shape if ids is not None else embeds.shape[:2]
        device = (ids if ids is not None else embeds).device
        cache = kwargs.get("past_key_values")
        past = (
            cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        )
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:  # [batch, past + length]: 0 marks left padding
            positions = (mask.long().cumsum(-1) - 1)[:, -length:].masked_fill(
                mask[:, -length:] == 0, -1
            )
        elif kwargs.get("position_ids") is not None:
            positions = kwargs["position_ids"].expand(batch, -1)
        else:
            positions = torch.arange(past, past + length, device=device).expand(batch, -1)
        if past == 0:
            self.stored = {}  # a new sequence: forget the last one's values
        self.positions = positions

    def _clamp(self, layer: int, activation: torch.Tensor) -> torch.Tensor:
        positions = self.positions
        if positions is None or positions.shape != activation.shape[:2]:
            raise SinklensError(
                "the patch saw an activation it cannot place (positions unknown)",
                "run the model through its normal forward; the patch follows the decoder's inputs",
            )
        positions = positions.to(activation.device)
        chosen = [i for i, (l, _) in enumerate(self.patch.neurons) if l == layer]
        neurons = torch.tensor([self.patch.neurons[i][1] for i in chosen], device=activation.device)
        values = activation[:, :, neurons]  # [batch, pos, neuron]
        if self.patch.value == "calibrated":
            calibrated = self.patch.values
            assert calibrated is not None  # SinkPatch.__post_init__ requires values when calibrated
            target = torch.tensor(
                [calibrated[i] for i in chosen],
                device=activation.device,
                dtype=activation.dtype,
            ).expand(activation.shape[0], -1)
        else:
            if layer not in self.stored:
                self.stored[layer] = torch.full(
                    (activation.shape[0], len(chosen)),
                    float("nan"),
                    device=activation.device,
                    dtype=activation.dtype,
                )
            at_one = positions == 1  # the first token after the start, where this forward holds it
            rows = at_one.any(-1)
            if rows.any():
                self.stored[layer][rows] = values[rows][at_one[rows]].view(-1, len(chosen))
            target = self.stored[layer]
        clamp = (positions >= 1)[..., None] & ~torch.isnan(target)[:, None, :]
        activation = activation.clone()
        activation[:, :, neurons] = torch.where(clamp, target[:, None, :].expand_as(values), values)
        return activation


def _shape(model: nn.Module) -> tuple[int, int]:
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        return cfg.n_layers, cfg.d_mlp
    # a Hugging Face config (nn.Module.__getattr__ would type it Tensor | Module)
    config: Any = model.config
    return config.num_hidden_layers, config.intermediate_size


def patch_for(
    model,
    neurons: Sequence[tuple[int, int]],
    *,
    hook: str = "up",
    value: str = "first_after_start",
    values: Sequence[float] | None = None,
    selection: dict | None = None,
) -> SinkPatch:
    """A patch of ``neurons`` (``(layer, index)`` pairs) for ``model`` (a bridge or a Hugging Face model),
    recording its name and shape."""
    n_layers, d_mlp = _shape(model)
    source = getattr(model, "sinklens_source", None)
    name = (
        source.name
        if source
        else getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__)
    )
    return SinkPatch(
        name,
        n_layers,
        d_mlp,
        tuple((int(l), int(n)) for l, n in neurons),
        hook,
        value,
        None if values is None else tuple(float(v) for v in values),
        selection or {},
    )
