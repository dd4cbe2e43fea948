"""What a model is shaped like, without loading it: the facts of its `config.json` that decide whether
a run fits (heads for sequence parallelism, context length, sizes for memory).

A model reference resolves to a `config.json` in this order: `tiny` / `tiny-7b-layout` (locally built models), a local
checkpoint folder, a folder URL (fsspec: s3://, gs://, ...), and for hub ids without local weights the
architecture files shipped with lvr under `configs/architectures/<org>--<name>.json` (no weights,
refreshed with `lvr models architecture MODEL --from SNAPSHOT`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

ARCHITECTURES_PACKAGE = "configs"
ARCHITECTURES_DIR = "architectures"


class ArchitectureError(ValueError):
    """A model whose architecture cannot be found or read."""


@dataclass(frozen=True)
class VisionArchitecture:
    hidden_size: int
    depth: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    in_channels: int = 3

    @property
    def num_parameters(self) -> int:
        """Patch embedding, blocks (attention with qkv bias, gated MLP with bias, two norms), and the
        merger (norm, two linears over the merged 2x2 patches)."""
        h, i = self.hidden_size, self.intermediate_size
        patch = self.in_channels * self.temporal_patch_size * self.patch_size**2 * h
        block = (3 * h * h + 3 * h) + (h * h + h) + (2 * h * i + 2 * i) + (i * h + h) + 2 * h
        merged = h * self.spatial_merge_size**2
        merger = h + (merged * merged + merged) + (merged * self.out_hidden_size + self.out_hidden_size)
        return patch + self.depth * block + merger


@dataclass(frozen=True)
class Architecture:
    """The text model of a (vision-)language model, and its vision tower when it has one."""

    source: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    mrope_section: tuple[int, ...] | None = None
    vision: VisionArchitecture | None = None
    video_tokens_per_frame: int | None = None  # models with their own video processor (NVILA)

    @property
    def text_parameters(self) -> int:
        """Embeddings, decoder layers (q/k/v with bias, o, gated MLP, two RMSNorms), final norm, LM head."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attention = (h * q + q) + 2 * (h * kv + kv) + q * h
        layer = attention + 3 * h * i + 2 * h
        embeddings = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return embeddings + self.num_layers * layer + h + head

    @property
    def num_parameters(self) -> int:
        return self.text_parameters + (self.vision.num_parameters if self.vision else 0)


def architecture_file_name(model_id: str) -> str:
    """`Qwen/Qwen2.5-VL-7B-Instruct` -> `Qwen--Qwen2.5-VL-7B-Instruct.json` (hub ids hold one `/`)."""
    return model_id.strip("/").replace("/", "--") + ".json"


def shipped_architectures() -> dict[str, Any]:
    """Model id -> the shipped architecture file (a Traversable) of every model lvr knows without weights."""
    folder = files(ARCHITECTURES_PACKAGE) / ARCHITECTURES_DIR
    found: dict[str, Any] = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".json"):
            found[entry.name.removesuffix(".json").replace("--", "/", 1)] = entry
    return found


def _read_json(text: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArchitectureError(f"{where}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ArchitectureError(f"{where}: expected a JSON object")
    return data


def load_config_json(ref: str) -> tuple[dict[str, Any], str]:
    """The `config.json` of a model reference (see the module docstring) and where it was read."""
    from models.tiny import tiny_architecture_dir

    built = tiny_architecture_dir(ref)
    if built is not None:
        path = built / "config.json"
        return _read_json(path.read_text(encoding="utf-8"), str(path)), str(path)
    local = Path(ref).expanduser()
    if local.is_dir():
        path = local / "config.json"
        if not path.is_file():
            raise ArchitectureError(f"model folder {ref} has no config.json")
        return _read_json(path.read_text(encoding="utf-8"), str(path)), str(path)
    if "://" in ref:
        import fsspec

        uri = ref.rstrip("/") + "/config.json"
        try:
            with fsspec.open(uri, "r", encoding="utf-8") as fh:
                return _read_json(fh.read(), uri), uri
        except FileNotFoundError as exc:
            raise ArchitectureError(f"model folder {ref} has no config.json") from exc
    shipped = shipped_architectures()
    if ref in shipped:
        entry = shipped[ref]
        return _read_json(entry.read_text(encoding="utf-8"), f"lvr's {entry.name}"), f"configs/{ARCHITECTURES_DIR}/{entry.name}"
    known = ", ".join(sorted(shipped)) or "none"
    raise ArchitectureError(
        f"cannot find the architecture of model {ref!r}: not 'tiny', not a local folder or URL with config.json, and not "
        f"one of the architectures shipped with lvr ({known}); add it with `lvr models architecture {ref} --from SNAPSHOT`"
    )


def _int(section: dict[str, Any], key: str, where: str) -> int:
    value = section.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ArchitectureError(f"{where}: {key} missing or not an integer")
    return value


def parse_architecture(config: dict[str, Any], source: str) -> Architecture:
    """An `Architecture` from a config.json in either layout: transformers 5 nests the text model under
    `text_config`; older files (and the hub's Qwen2.5-VL) keep it at the top level."""
    text = config.get("text_config") or config
    hidden = _int(text, "hidden_size", source)
    heads = _int(text, "num_attention_heads", source)
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or hidden // heads
    rope = text.get("rope_parameters") or text.get("rope_scaling") or config.get("rope_scaling") or {}
    mrope = rope.get("mrope_section") if isinstance(rope, dict) else None
    vision = config.get("vision_config")
    tie = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return Architecture(
        source=source,
        model_type=str(config.get("model_type", text.get("model_type", "unknown"))),
        hidden_size=hidden,
        num_layers=_int(text, "num_hidden_layers", source),
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        intermediate_size=_int(text, "intermediate_size", source),
        vocab_size=_int(text, "vocab_size", source),
        max_position_embeddings=_int(text, "max_position_embeddings", source),
        tie_word_embeddings=bool(tie),
        mrope_section=tuple(mrope) if mrope else None,
        vision=_vision(vision, source) if isinstance(vision, dict) else None,
        video_tokens_per_frame=config.get("video_tokens_per_frame"),
    )


def _vision(v: dict[str, Any], source: str) -> VisionArchitecture:
    where = f"{source} vision_config"
    return VisionArchitecture(
        hidden_size=_int(v, "hidden_size", where),
        depth=_int(v, "depth", where),
        num_heads=_int(v, "num_heads", where),
        intermediate_size=_int(v, "intermediate_size", where),
        out_hidden_size=_int(v, "out_hidden_size", where),
        patch_size=int(v.get("patch_size", 14)),
        spatial_merge_size=int(v.get("spatial_merge_size", 2)),
        temporal_patch_size=int(v.get("temporal_patch_size", 2)),
        in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
    )


def load_architecture(ref: str) -> Architecture:
    config, source = load_config_json(ref)
    return parse_architecture(config, source)


def architecture_record(model_id: str, config: dict[str, Any], file: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON lvr ships for a model: its config.json (checked to parse) with where it came from."""
    parse_architecture(config, model_id)  # refuse a file lvr check could not read
    header = {"model": model_id, "file": file, "note": f"Architecture facts only (no weights), for lvr check. Refresh: "
              f"lvr models architecture {model_id} --from SNAPSHOT_OR_hub"}
    return {"_lvr": header, **{k: v for k, v in config.items() if k != "_lvr"}, **(extra or {})}


def write_architecture(model_id: str, record: dict[str, Any], out_dir: str | Path | None = None) -> Path:
    """Write `record` as the shipped architecture of `model_id` (default: lvr's own folder)."""
    folder = Path(out_dir) if out_dir else Path(str(files(ARCHITECTURES_PACKAGE) / ARCHITECTURES_DIR))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / architecture_file_name(model_id)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
