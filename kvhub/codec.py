"""The codec: how each layer's keys and values are stored. Plain dataclasses, no torch, so configs and the CLI
can read and validate them cheaply.

A stream (the keys or the values of one layer) is rotated onto its PCA basis, whose components are ordered by
calibrated variance, then cut into *segments* of consecutive components, each stored at its own bit width: more
bits on the high-variance components, fewer (or none) on the tail. This is transform coding: it spends bits by
variance instead of cutting a rank and quantizing what is left uniformly. ``rank`` is the number of components with
bits > 0; the dropped tail is never stored. All KV heads of a layer share the segment plan (each head has its own
basis and mean), which keeps the stored tensors rectangular and attention in the compressed space vectorized.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .errors import CodecError

BITS = (0, 2, 4, 8, 16)
Projection = Literal["pca", "identity"]
ScaleScheme = Literal["token", "rms", "channel"]
# Level sets of kvhub.quantizers (named here so a preset validates without torch); lloyd-max and vq (vector codes)
# need a deviation scale.
QUANTIZERS = ("uniform", "lloyd-max", "vq")
# How a per-token scale is stored (kvhub.quantizers), and its bits.
SCALE_FORMATS = {"fp16": 16, "log8": 8}
_DEVIATION_SCALES = ("rms", "channel")
STREAMS = ("keys", "values")
_PACK = {2: 4, 4: 2}
MAX_LAYERS = 1024  # the schema's bound: a codec is built layer by layer, so a count from a file is checked first


@dataclass(frozen=True)
class Segment:
    """``size`` consecutive components stored at ``bits`` bits (0: dropped, 16: fp16 passthrough)."""

    size: int
    bits: int


@dataclass(frozen=True)
class BitsCode:
    """The scale scheme and quantizer of a stream's ``bits``-bit segments where they differ from the stream's own.

    Why per bit width: the right code depends on how coarse it is. Keys' 4-bit segments lose least with absmax scales
    (nothing clips), their 2-bit tails with RMS scales and Gaussian levels: an absmax puts four levels so far apart
    that, on Gaussian coefficients of 16 to 32 components, the MSE is half as much again as with the optimal uniform
    step, or more, and about twice that of vector codes (tests/test_codes_by_bits.py; in perplexity: frontier-4.md)."""

    bits: int
    scale: ScaleScheme
    quantizer: str

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "scale": self.scale, "quantizer": self.quantizer}


@dataclass(frozen=True)
class StreamCodec:
    """How one stream (keys or values) of one layer is stored. ``scale`` and ``quantizer`` code every quantized
    segment but those of a bit width ``by_bits`` names (:meth:`code_of`)."""

    segments: tuple[Segment, ...]
    projection: Projection = "pca"
    scale: ScaleScheme = "token"
    quantizer: str = "uniform"
    scale_format: str = "fp16"
    by_bits: tuple[BitsCode, ...] = ()

    @property
    def rank(self) -> int:
        """Components actually stored, per head."""
        return sum(s.size for s in self.segments if s.bits > 0)

    @property
    def dim(self) -> int:
        return sum(s.size for s in self.segments)

    @property
    def kept(self) -> tuple[Segment, ...]:
        return tuple(s for s in self.segments if s.bits > 0)

    def code_of(self, bits: int) -> tuple[str, str]:
        """``(scale, quantizer)`` of this stream's ``bits``-bit segments."""
        for code in self.by_bits:
            if code.bits == bits:
                return code.scale, code.quantizer
        return self.scale, self.quantizer

    @property
    def quantizers(self) -> tuple[str, ...]:
        """Every quantizer a kept quantized segment uses, sorted."""
        return tuple(sorted({self.code_of(s.bits)[1] for s in self.kept if s.bits < 16}))

    def bits_per_token(self) -> int:
        """Bits one token of one head costs: codes plus one scale (16 or 8 bits: ``scale_format``) per quantized
        segment (per-token schemes)."""
        codes = sum(s.size * s.bits for s in self.segments)
        width = SCALE_FORMATS.get(self.scale_format, 16)
        scales = width * sum(1 for s in self.kept if s.bits < 16) if self.scale != "channel" else 0
        return codes + scales

    def check(self, where: str, head_dim: int) -> None:
        """Raise :class:`CodecError` naming ``where`` if this stream cannot encode ``head_dim``-sized vectors."""
        if not self.segments:
            raise CodecError(f"{where}: no segments; fix: give at least one [size, bits] segment")
        for s in self.segments:
            if s.bits not in BITS:
                raise CodecError(f"{where}: bits={s.bits} is not one of {BITS}; fix: use 2, 4, 8 or 16 (0 drops)")
            if s.size <= 0:
                raise CodecError(f"{where}: segment size {s.size} must be positive")
            if s.bits in _PACK and s.size % _PACK[s.bits]:
                raise CodecError(
                    f"{where}: a {s.bits}-bit segment of {s.size} components cannot be packed; "
                    f"fix: make its size a multiple of {_PACK[s.bits]}"
                )
        if self.dim != head_dim:
            raise CodecError(
                f"{where}: segments cover {self.dim} components but the model's head_dim is {head_dim}; "
                f"fix: make the segment sizes sum to {head_dim}"
            )
        if self.rank == 0:
            raise CodecError(f"{where}: every segment has 0 bits; fix: keep at least one component")
        bits = [s.bits for s in self.segments]
        if bits != sorted(bits, reverse=True):
            raise CodecError(f"{where}: bits {bits} must not increase along the variance-ordered components")
        if self.projection == "identity" and (self.rank != head_dim or self.scale == "channel"):
            raise CodecError(
                f"{where}: an identity projection has no variance order; fix: drop no component and use a per-token scale"
            )
        if self.projection not in ("pca", "identity"):
            raise CodecError(f"{where}: projection '{self.projection}' is not 'pca' or 'identity'")
        if self.scale not in ("token", "rms", "channel"):
            raise CodecError(f"{where}: scale '{self.scale}' is not 'token', 'rms' or 'channel'")
        if self.scale_format not in SCALE_FORMATS:
            raise CodecError(f"{where}: scale_format '{self.scale_format}' is not one of {tuple(SCALE_FORMATS)}")
        if self.scale_format != "fp16" and self.scale == "channel":
            raise CodecError(f"{where}: a 'channel' scale stores nothing per token; fix: drop scale_format or use "
                             "scale 'token' or 'rms'")
        self._check_by_bits(where)
        self._check_code(where, self.scale, self.quantizer,
                         {s.bits for s in self.segments if 0 < s.bits < 16} - {c.bits for c in self.by_bits})
        for code in self.by_bits:
            self._check_code(f"{where} {code.bits}-bit segments", code.scale, code.quantizer, {code.bits})

    def _check_by_bits(self, where: str) -> None:
        widths = [code.bits for code in self.by_bits]
        if len(set(widths)) != len(widths):
            raise CodecError(f"{where}: by_bits names a bit width twice; fix: give each width one code")
        for code in self.by_bits:
            if code.bits not in (2, 4, 8) or not any(s.bits == code.bits for s in self.segments):
                raise CodecError(f"{where}: by_bits codes {code.bits}-bit segments, which this stream has none of; "
                                 "fix: drop that entry or give it a width the segments use")
            if code.scale not in ("token", "rms") or self.scale == "channel":
                raise CodecError(f"{where}: by_bits may only choose between per-token scales ('token' or 'rms'), "
                                 "and only in a stream scaled per token; fix: drop by_bits or use scale 'token' or "
                                 "'rms' throughout")

    @staticmethod
    def _check_code(where: str, scale: str, quantizer: str, widths: set[int]) -> None:
        """The quantizer exists and fits the scale and the bit widths it codes."""
        if quantizer not in QUANTIZERS:
            raise CodecError(f"{where}: quantizer '{quantizer}' is not one of {QUANTIZERS}")
        gaussian = {"lloyd-max": "Lloyd-Max levels", "vq": "vector codebooks"}.get(quantizer)
        if gaussian and scale not in _DEVIATION_SCALES:
            raise CodecError(f"{where}: {gaussian} are those of a unit Gaussian; fix: use scale 'rms' or 'channel'")
        if gaussian and 8 in widths:
            raise CodecError(f"{where}: {gaussian} are tabulated for 2 and 4 bits; fix: use the uniform quantizer")

    @classmethod
    def uniform(cls, head_dim: int, bits: int, rank: int | None = None, **kw: Any) -> "StreamCodec":
        """Rank ``rank`` (default: all) at one bit width, the rest dropped."""
        rank = head_dim if rank is None else rank
        if rank > head_dim:
            raise CodecError(f"rank {rank} is larger than head_dim {head_dim}; fix: use a rank <= {head_dim}")
        segs = [Segment(rank, bits)] + ([Segment(head_dim - rank, 0)] if rank < head_dim else [])
        return cls(tuple(segs), **kw)

    def to_dict(self) -> dict[str, Any]:
        """The quantizer and scale format are written only when they are not the default, so presets made before
        they existed re-save byte for byte."""
        out = {"segments": [[s.size, s.bits] for s in self.segments], "projection": self.projection, "scale": self.scale}
        if self.quantizer != "uniform":
            out["quantizer"] = self.quantizer
        if self.scale_format != "fp16":
            out["scale_format"] = self.scale_format
        if self.by_bits:
            out["by_bits"] = [code.to_dict() for code in self.by_bits]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StreamCodec":
        return cls(
            segments=tuple(Segment(int(a), int(b)) for a, b in d["segments"]),
            projection=d.get("projection", "pca"),
            scale=d.get("scale", "token"),
            quantizer=d.get("quantizer", "uniform"),
            scale_format=d.get("scale_format", "fp16"),
            by_bits=tuple(BitsCode(int(c["bits"]), c["scale"], c["quantizer"]) for c in d.get("by_bits", ())),
        )


@dataclass(frozen=True)
class LayerCodec:
    """One layer: its keys and values codecs and how many sink/recent tokens stay in full precision.

    ``compressed=False`` keeps the stock transformers layer (e.g. for a layer type kvhub cannot compress)."""

    keys: StreamCodec
    values: StreamCodec
    sink: int = 4
    window: int = 32
    compressed: bool = True

    def stream(self, name: str) -> StreamCodec:
        return self.keys if name == "keys" else self.values

    def to_dict(self) -> dict[str, Any]:
        return {
            "keys": self.keys.to_dict(),
            "values": self.values.to_dict(),
            "sink": self.sink,
            "window": self.window,
            "compressed": self.compressed,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerCodec":
        return cls(
            keys=StreamCodec.from_dict(d["keys"]),
            values=StreamCodec.from_dict(d["values"]),
            sink=int(d.get("sink", 4)),
            window=int(d.get("window", 32)),
            compressed=bool(d.get("compressed", True)),
        )


@dataclass(frozen=True)
class ModelShape:
    """The facts of a model's attention that a codec must agree with."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(int(config.num_hidden_layers), int(heads), int(head_dim))


@dataclass(frozen=True)
class CacheCodec:
    """Every layer's codec, plus the flush block: how many tokens past the window accumulate before they are
    compressed together (encoding in blocks amortizes the projection; history is never re-quantized), whether
    keys are coded before RoPE (:mod:`kvhub.rope`: the key bases are then fitted on un-turned keys), and
    ``secondary_sinks``: a token-head whose value vector is shorter than this fraction of its layer and head's
    calibrated median length keeps its key and value exact beside its codes (:mod:`kvhub.secondary_sinks`; 0: none)."""

    layers: tuple[LayerCodec, ...]
    flush_block: int = 16
    keys_before_rope: bool = False
    secondary_sinks: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def uniform(
        cls,
        shape: ModelShape,
        key_bits: int = 8,
        value_bits: int = 8,
        key_rank: int | None = None,
        value_rank: int | None = None,
        sink: int = 4,
        window: int = 32,
        projection: Projection = "pca",
        scale: ScaleScheme = "token",
        compress_keys: bool = True,
    ) -> "CacheCodec":
        """The same setting on every layer. ``compress_keys=False`` keeps keys in fp16 (the inherited V-only recipe)."""
        d = shape.head_dim
        keys = StreamCodec.uniform(d, key_bits if compress_keys else 16, key_rank if compress_keys else None,
                                   projection=projection if compress_keys else "identity", scale=scale)
        values = StreamCodec.uniform(d, value_bits, value_rank, projection=projection, scale=scale)
        return cls(tuple(LayerCodec(keys, values, sink, window) for _ in range(shape.num_layers)))

    def check(self, shape: ModelShape) -> None:
        """Raise :class:`CodecError` if this codec does not fit a model of ``shape``."""
        if len(self.layers) != shape.num_layers:
            raise CodecError(
                f"the codec describes {len(self.layers)} layers but the model has {shape.num_layers}; "
                "fix: use a preset made for this model"
            )
        if self.flush_block < 1:
            raise CodecError(f"flush_block={self.flush_block} must be >= 1")
        if not 0 <= self.secondary_sinks < 1:
            raise CodecError(f"secondary_sinks={self.secondary_sinks} is not a fraction of the median value length in "
                             "[0, 1); fix: use 0 (none) or a threshold such as 0.3")
        if self.secondary_sinks and any(layer.values.projection != "pca" for layer in self.layers if layer.compressed):
            raise CodecError("secondary_sinks flags tokens against calibrated value lengths, which only PCA-projected "
                             "values have; fix: project every compressed layer's values onto a basis, or drop "
                             "secondary_sinks")
        for i, layer in enumerate(self.layers):
            if layer.sink < 0 or layer.window < 0:
                raise CodecError(f"layer {i}: sink and window must be >= 0")
            for name in STREAMS:
                layer.stream(name).check(f"layer {i} {name}", shape.head_dim)

    def with_layer(self, index: int, layer: LayerCodec) -> "CacheCodec":
        layers = list(self.layers)
        layers[index] = layer
        return replace(self, layers=tuple(layers))

    def to_dict(self) -> dict[str, Any]:
        """Compact form: a ``default`` layer plus only the layers that differ from it."""
        dicts = [layer.to_dict() for layer in self.layers]
        default = max(dicts, key=dicts.count)
        out: dict[str, Any] = {"num_layers": len(dicts), "flush_block": self.flush_block, "default": default}
        if self.keys_before_rope:  # written only when set, so presets made before it existed re-save byte for byte
            out["keys_before_rope"] = True
        if self.secondary_sinks:
            out["secondary_sinks"] = self.secondary_sinks
        overrides = {str(i): d for i, d in enumerate(dicts) if d != default}
        if overrides:
            out["layers"] = overrides
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CacheCodec":
        default = d["default"]
        overrides = d.get("layers", {})
        count = int(d["num_layers"])
        if not 1 <= count <= MAX_LAYERS:
            raise CodecError(f"codec.num_layers is {count}; fix: give the model's layer count (1 to {MAX_LAYERS})")
        stray = [k for k in overrides if not (k.isdigit() and str(int(k)) == k and int(k) < count)]
        if stray:
            raise CodecError(f"codec.layers has the key '{stray[0][:32]}', not a layer index below num_layers={count} "
                             "written without leading zeros; fix: key overrides by layer index (0, 1, ...)")
        layers = tuple(LayerCodec.from_dict(overrides.get(str(i), default)) for i in range(count))
        return cls(layers, flush_block=int(d.get("flush_block", 16)), keys_before_rope=bool(d.get("keys_before_rope", False)),
                   secondary_sinks=float(d.get("secondary_sinks", 0.0)))

    def describe(self) -> list[dict[str, Any]]:
        """One row per layer for tables: rank and bits layout of keys and values."""
        rows = []
        for i, layer in enumerate(self.layers):
            row: dict[str, Any] = {"layer": i, "sink": layer.sink, "window": layer.window}
            for name in STREAMS:
                s = layer.stream(name)
                row[name] = {"rank": s.rank, "layout": "+".join(f"{g.size}x{g.bits}b" for g in s.kept),
                             "scale": s.scale, "scale_format": s.scale_format, "quantizer": s.quantizer, "projection": s.projection, "bits_per_token": s.bits_per_token(),
                             "by_bits": [c.to_dict() for c in s.by_bits]}
            rows.append(row)
        return rows
