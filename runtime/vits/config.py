"""Hyperparameters of the VITS inference graph (stochastic duration predictor; one or many speakers)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass(frozen=True)
class VitsConfig:
    num_symbols: int = 256
    hidden_channels: int = 192  # text encoder width == inter (latent) channels
    filter_channels: int = 768
    n_heads: int = 2
    n_layers: int = 6
    kernel_size: int = 3
    window_size: int = 4
    # stochastic duration predictor
    dp_filter_channels: int = 192
    dp_kernel_size: int = 3
    dp_n_flows: int = 4
    dp_num_bins: int = 10
    dp_tail_bound: float = 5.0
    # residual coupling flows (mean-only)
    flow_n_flows: int = 4
    flow_kernel_size: int = 5
    flow_dilation_rate: int = 1
    flow_n_layers: int = 4
    # HiFi-GAN generator: resblock "1" (convs1/convs2 pairs) or "2" (one conv per dilation)
    resblock: str = "2"
    resblock_kernel_sizes: tuple[int, ...] = (3, 5, 7)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 2), (2, 6), (3, 12))
    upsample_rates: tuple[int, ...] = (8, 8, 4)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16, 8)
    upsample_initial_channel: int = 256
    # multi-speaker: speaker embedding emb_g [n_speakers, gin] conditions the duration
    # predictor, the coupling flows and the decoder (0 / 1: single speaker)
    gin_channels: int = 0
    n_speakers: int = 1
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def hop_length(self) -> int:
        n = 1
        for r in self.upsample_rates:
            n *= r
        return n

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VitsConfig":
        known = {f.name for f in fields(cls)} - {"extra"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown VITS hyperparameters: {unknown}")
        kw = dict(d)
        for key in ("resblock_kernel_sizes", "upsample_rates", "upsample_kernel_sizes"):
            if key in kw:
                kw[key] = tuple(int(v) for v in kw[key])
        if "resblock_dilation_sizes" in kw:
            kw["resblock_dilation_sizes"] = tuple(tuple(int(v) for v in ds) for ds in kw["resblock_dilation_sizes"])
        if str(kw.get("resblock", "2")) not in ("1", "2"):
            raise ValueError(f"resblock must be '1' or '2', got {kw['resblock']!r}")
        if "resblock" in kw:
            kw["resblock"] = str(kw["resblock"])
        if (int(kw.get("n_speakers", 1)) > 1) != (int(kw.get("gin_channels", 0)) > 0):
            raise ValueError("n_speakers > 1 needs gin_channels > 0 and the reverse")
        return cls(**kw)
