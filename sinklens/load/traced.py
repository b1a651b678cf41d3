"""The nnsight backend: the same model, run through nnsight traces, on this machine or on NDIF.

``load_model(spec, backend="nnsight")`` gives a :class:`TracedModel`: the Hugging Face model wrapped by
nnsight, with the surface sinklens' analyses read (``cfg``, ``tokenizer``, ``blocks[L].mlp.W_out``) and a
table from TransformerLens hook names to the Hugging Face modules that compute them, so
:func:`~sinklens.run.cache.run_cache` runs every analysis that only runs the model, reads activations by hook
name and edits them (ablations) unchanged, as nnsight traces. The table comes from TransformerLens' own
architecture adapter (the one ``TransformerBridge`` is built from), so ``blocks.3.mlp.hook_post`` names the
input of layer 3's ``down_proj`` exactly where the bridge reads it, on every architecture TransformerLens
supports.

With ``remote=True`` the model is never loaded here: nnsight builds it on the meta device from its config
and every trace runs on an NDIF server (``NDIF_API_KEY``, host ``NDIF_HOST`` or ``host=``, a self-hosted
NDIF included), which returns only the values the analysis saves. ``remote="local"`` is nnsight's own local
simulation of that: each trace is serialised as for the server, then run here. What a remote model cannot
give (gradients, installing a patch on a shared model, hooks that report through Python state, generation)
is refused in one line naming the backend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sinklens.errors import SinklensError
from sinklens.load.device_memory import text_config
from sinklens.load.ndif import NdifHost, first_line, require_nnsight
from sinklens.load.sources import ModelSource

_PATTERN = "hook_pattern"
_FIX_BACKEND = (
    "run it with the TransformerLens backend (leave out backend='nnsight' / --backend nnsight)"
)
# Where each part of a block (and of its MLP) runs, in the order a pre-norm decoder runs them; TransformerLens'
# names.
_EXECUTION_ORDER = (
    "ln1",
    "attn",
    "ln1_post",
    "ln2",
    "mlp",
    "ln2_post",
    "gate",
    "in",
    "out",
)
_TOP_ORDER = ("embed", "pos_embed", "rotary_emb", "blocks", "ln_final", "unembed")


@dataclass(frozen=True)
class Site:
    """Where a TransformerLens hook lives in the Hugging Face model: a module's ``input`` or ``output``, or the
    attention weights an eager attention module returns (``weights``); ``order`` sorts sites in the order
    the model computes them, which nnsight requires of reads and writes."""

    path: str
    io: str
    order: tuple


def _rank(name: str, names: tuple[str, ...]) -> int:
    return names.index(name) if name in names else len(names)


def hook_sites(adapter: Any, n_layers: int) -> dict[str, Site]:
    """Every hook name the bridge of ``adapter``'s architecture has at a module boundary (aliases such as
    ``blocks.L.mlp.hook_post`` included) and the site that computes it, for layers ``0..n_layers-1``."""
    sites: dict[str, Site] = {}

    def add(component: Any, tl_path: str, hf_path: str, order: tuple) -> None:
        sites[f"{tl_path}.hook_in"] = Site(hf_path, "input", (*order, 0))
        sites[f"{tl_path}.hook_out"] = Site(hf_path, "output", (*order, 2))
        attention = hasattr(component, "hook_pattern") or type(component).__name__.endswith(
            "AttentionBridge"
        )
        # an attention's inner hooks (hook_q, hook_z, ...) are per head on the bridge, not at a module boundary
        if attention:
            sites[f"{tl_path}.{_PATTERN}"] = Site(hf_path, "weights", (*order, 2))
            return
        children = getattr(component, "submodules", None) or {}
        for name, child in children.items():
            rank = (*order, 1, _rank(name, _EXECUTION_ORDER))
            add(child, f"{tl_path}.{name}", f"{hf_path}.{child.name}", rank)
        # the component's own aliases: a block with post-norms reads hook_mlp_out after ln2_post
        for alias, targets in (getattr(component, "hook_aliases", None) or {}).items():
            found = [
                f"{tl_path}.{target}"
                for target in ([targets] if isinstance(targets, str) else targets)
                if f"{tl_path}.{target}" in sites
            ]
            if found:
                sites[f"{tl_path}.{alias}"] = sites[found[0]]

    for name, component in adapter.component_mapping.items():
        top = _rank(name, _TOP_ORDER)
        if name == "blocks":
            for layer in range(n_layers):
                add(component, f"blocks.{layer}", f"{component.name}.{layer}", (top, layer))
        else:
            add(component, name, component.name, (top, 0))
    return sites


def _bridge_config(hf_config: Any, model_name: str, dtype: torch.dtype):
    """The TransformerLens config and architecture adapter the bridge would build for ``hf_config``, without a
    model: the same ``cfg`` (``n_layers``, ``d_mlp``, ``gated_mlp``, ...) and the same hook names."""
    from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_config_from_hf
    from transformer_lens.model_bridge.sources._hf_format import (
        determine_architecture_from_hf_config,
    )

    try:
        architecture = determine_architecture_from_hf_config(hf_config)
        config = build_bridge_config_from_hf(hf_config, architecture, model_name, dtype)
        return ArchitectureAdapterFactory.select_architecture_adapter(config)
    except (ValueError, NotImplementedError, KeyError) as exc:
        raise SinklensError(
            f"TransformerLens has no architecture adapter for {model_name}: {first_line(exc)}",
            "use a causal LM architecture that TransformerLens supports (Llama, Gemma, Mistral, Qwen, GPT-2, ...)",
        ) from exc


class BackendRefusal(SinklensError, AttributeError):
    """What the nnsight backend cannot give, asked of a :class:`TracedModel`: one clear line, and an
    ``AttributeError`` too, so that ``getattr(model, name, default)`` and ``hasattr`` still answer."""


class _Mlp:
    """``blocks[L].mlp`` as the analyses read it: ``W_out`` (``[d_mlp, d_model]``, TransformerLens' layout)."""

    def __init__(self, model: TracedModel, path: str):
        self._model, self._path = model, path

    @property
    def W_out(self) -> torch.Tensor:
        return self._model.weight_of(self._path)


class _Block:
    def __init__(self, model: TracedModel, layer: int):
        self.mlp = _Mlp(model, model.site(f"blocks.{layer}.mlp.hook_post").path)
        if f"blocks.{layer}.ln2_post.hook_in" in model.sites:
            self.ln2_post = model.site(f"blocks.{layer}.ln2_post.hook_in").path


class TracedModel:
    """A model for sinklens' analyses that runs as nnsight traces: here (``remote=None``), in nnsight's local
    simulation of a remote run (``"local"``) or on an NDIF host (a URL). Built by
    ``load_model(spec, backend="nnsight")``; :func:`~sinklens.run.cache.run_cache` runs it."""

    backend = "nnsight"

    def __init__(
        self,
        envoy: Any,
        tokenizer: Any,
        source: ModelSource,
        dtype: torch.dtype,
        *,
        simulate: bool = False,
        host: NdifHost | None = None,
    ):
        self.envoy = envoy
        self.tokenizer = tokenizer
        self.sinklens_source = source
        self.host = host
        # where traces run: None here, "local" in nnsight's simulation of a remote run, else the host's URL
        self.remote = host.url if host is not None else "local" if simulate else None
        self.original_model = envoy._module
        hf_config = self.original_model.config
        adapter = _bridge_config(hf_config, source.name, dtype)
        self.cfg = adapter.cfg
        # a remote model is built on the meta device: its inputs are made on the CPU
        self.cfg.device = "cpu" if host else str(next(self.original_model.parameters()).device)
        self.sites = hook_sites(adapter, self.cfg.n_layers)
        self.blocks = [_Block(self, layer) for layer in range(self.cfg.n_layers)]
        self._weights: dict[str, torch.Tensor] = {}
        self.requests = 0  # traces run remotely (or in the local simulation of it)

    def __repr__(self) -> str:
        where = {None: "here", "local": "nnsight's local simulation"}.get(self.remote, self.remote)
        return f"TracedModel({self.cfg.model_name}, nnsight, {where})"

    def site(self, name: str) -> Site:
        """The site of hook ``name``, or one clear error for a hook the nnsight backend cannot reach."""
        site = self.sites.get(name)
        if site is None:
            raise SinklensError(
                f"the nnsight backend has no hook {name!r} ({self.cfg.model_name} computes it inside a module, "
                "not at a module's input or output)",
                f"read a hook at a module boundary (resid, mlp_out, mlp.hook_post, hook_pattern), or {_FIX_BACKEND}",
            )
        return site

    def weight_of(self, path: str) -> torch.Tensor:
        """The weight of the linear layer at ``path`` as TransformerLens lays it out (``[d_in, d_out]``), read
        from the local module or, for a remote model, by a trace that returns it (once per layer)."""
        if path not in self._weights:
            module = self.original_model.get_submodule(path)
            if self.remote is None:
                weight = module.weight.detach()
            else:
                weight = _remote_weight(self, path)
            # nn.Linear stores [out, in]; GPT-2's Conv1D already [in, out]
            self._weights[path] = weight.T if isinstance(module, torch.nn.Linear) else weight
        return self._weights[path]

    def placement(self) -> dict[str, str]:
        """Where it runs, as results record it: the backend, the dtype and the device or host."""
        dtype = str(self.cfg.dtype).removeprefix("torch.")
        if self.host is not None:  # the server runs the dtype its deployment says
            return {"backend": "nnsight", "dtype": f"{dtype} (declared)", "device": self.host.url}
        simulated = (
            " (nnsight's local simulation of a remote run)" if self.remote == "local" else ""
        )
        return {"backend": f"nnsight{simulated}", "dtype": dtype, "device": str(self.cfg.device)}

    def use_attention(self, implementation: str) -> None:
        """Run attention as ``eager`` (which returns the attention weights, for a run that reads a pattern) or
        ``sdpa`` (the fused kernel, the numbers of the bridge's fused attention); a remote request carries
        the choice to the server."""
        if self.original_model.config._attn_implementation != implementation:
            self.original_model.set_attn_implementation(implementation)

    def parameters(self):
        """The local model's parameters (a remote model has none here: the server holds them)."""
        if self.remote is not None:
            raise SinklensError(
                f"{self.cfg.model_name} runs on {self.remote}: its weights are on the server",
                f"read weights inside a trace, or {_FIX_BACKEND}",
            )
        return self.original_model.parameters()

    def __getattr__(self, name: str):
        # Only reached for what TracedModel does not define: the bridge's surface (hooks, run_with_hooks,
        # generate, W_U, ...), which the analyses that need it read; they are refused here in one line.
        if name.startswith("__"):
            raise AttributeError(name)
        raise BackendRefusal(
            f"this analysis needs {name!r} of a TransformerBridge, which the nnsight backend does not give "
            "(it runs the model, reads activations by hook name and edits them; no gradients, generation "
            "or patches installed on the model)",
            _FIX_BACKEND,
        )

    def trace_backend(self) -> Any:
        """The nnsight backend a trace of this model runs with: None here, the local simulation, or a
        non-blocking request to its NDIF host (:class:`~sinklens.load.ndif.NdifHost`), which polls it."""
        self.requests += self.remote is not None
        if self.remote is None:
            return None
        if self.remote == "local":
            from nnsight.intervention.backends.local import LocalSimulationBackend

            return LocalSimulationBackend(self.envoy)
        assert self.host is not None  # remote is its URL
        return self.host.backend(self.envoy)

    @property
    def bytes_sent(self) -> int:
        """Bytes the remote requests carried to the host (0 for a model run here)."""
        return self.host.bytes_sent if self.host else 0

    @property
    def bytes_received(self) -> int:
        """Bytes of saved values the host sent back (0 for a model run here)."""
        return self.host.bytes_received if self.host else 0


def load_traced(
    location: str | Path,
    source: ModelSource,
    *,
    hf_model: Any = None,
    tokenizer: Any = None,
    remote: NdifHost | str | bool = False,
) -> TracedModel:
    """A :class:`TracedModel` of the loaded ``hf_model`` (``remote=False``, or ``"local"`` for nnsight's local
    simulation of a remote run), or, with ``remote`` an :class:`~sinklens.load.ndif.NdifHost`, of the model at
    ``location`` on that host (a hub name it serves, or a directory a self-hosted server shares), built here on
    the meta device from its config: its weights stay on the server."""
    from nnsight import TransformersModel

    if isinstance(remote, NdifHost):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(location))
            envoy = TransformersModel(str(location), tokenizer=tokenizer, task="text-generation")
        except Exception as exc:  # hub, access and file errors come in many types
            raise SinklensError(
                f"could not read the config and tokenizer of {location} ({first_line(exc)})",
                "a remote run reads them from the hub: check the name, the network and, for a gated model, "
                "HF_TOKEN; or pass a local directory holding them",
            ) from exc
        source = dataclasses.replace(
            source,
            bos_token_id=tokenizer.bos_token_id,
            n_layers=text_config(envoy._module.config).num_hidden_layers,
        )
        if Path(
            location
        ).is_dir():  # a directory has no hub id to canonicalise (which needs the network)
            from nnsight.modeling import huggingface

            huggingface._ID_CACHE[str(location)] = str(location)
        # the dtype the checkpoint declares; the server runs what its deployment says (results say so)
        declared = getattr(envoy._module.config, "dtype", None)
        dtype = getattr(torch, declared, None) if isinstance(declared, str) else declared
        dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
        return TracedModel(envoy, tokenizer, source, dtype, host=remote)
    envoy = TransformersModel(hf_model, tokenizer=tokenizer)
    return TracedModel(
        envoy,
        tokenizer,
        source,
        next(hf_model.parameters()).dtype,
        simulate=remote == "local",
    )


@contextmanager
def remote_errors(model: TracedModel) -> Iterator[None]:
    """For a model on an NDIF host, a request the host refuses or a host that does not answer as one line."""
    if model.host is None:
        yield
        return
    with model.host.errors():
        yield


def trace_outcome(model: TracedModel, backend: Any, saved: Any, what: str) -> Any:
    """What a trace saved in its variable ``saved``: the caller's variable here (nnsight sets it), the
    host's once its job is done."""
    if model.host is None:
        return saved
    return model.host.wait(backend, what)["saved"]


def _remote_weight(model: TracedModel, path: str) -> torch.Tensor:
    """The weight of the module at ``path`` of a remote model, read by a one-token trace that stops at once."""
    nnsight = require_nnsight()
    envoy, backend = model.envoy, model.trace_backend()
    token = torch.tensor([[model.tokenizer.bos_token_id or 0]], device=model.cfg.device)
    saved: dict[str, Any] = {}
    with remote_errors(model), torch.no_grad():
        with envoy.trace(token, backend=backend) as tracer:
            saved = nnsight.save({"weight": envoy.get(path).weight.detach().cpu()})
            tracer.stop()
    # in the checkpoint's dtype on the wire (half of float32's bytes for a bf16 model), float32 here
    return trace_outcome(model, backend, saved, f"the weight of {path}")["weight"].float()
